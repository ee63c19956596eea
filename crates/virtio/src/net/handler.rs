//! The virtio-net worker: frames from the TAP into the receive queue (0), frames from the
//! transmit queue (1) to the TAP, each with the 12-byte `virtio_net_hdr_v1` in front.
//!
//! Each direction may have a rate limiter (bytes/s of Ethernet frame and packets/s). A
//! received frame the limiter refuses stays pending in the handler (the TAP is not read
//! further); a transmit chain it refuses is put back on the avail ring. Either way the
//! limiter's timer, registered in the worker's epoll set, resumes that direction: neither
//! the edge-triggered TAP nor an EVENT_IDX driver would necessarily ring again.

use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rate_limiter::SharedRateLimiter;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_device::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::features::*;
use super::metrics::NetMetrics;
use super::{MAX_FRAME_BUF, VNET_HDR_LEN};
use crate::block::request::{parse_chain, Segment};
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::rng::fill::write_segments;
use crate::worker::{EventControl, EventSet, QueueHandler};

/// The host side of a NIC: a TAP queue, or a fake in tests.
pub trait NetBackend: Send {
    /// Read one frame (vnet header first); `WouldBlock` when none is queued.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one whole frame (vnet header first).
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// A descriptor readable when frames are queued (None: never).
    fn fd(&self) -> Option<RawFd>;
    /// Let the host hand us the offloaded frames the guest accepted (its acked features).
    fn set_offloads(&mut self, acked_features: u64) -> io::Result<()>;
    /// Another handle on the same host queue, for a new worker after a device reset.
    fn try_clone_box(&self) -> io::Result<Box<dyn NetBackend>>;
}

impl NetBackend for net::Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        net::Tap::read_frame(self, &mut [io::IoSliceMut::new(buf)])
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        net::Tap::write_frame(self, &[io::IoSlice::new(buf)])
    }

    fn fd(&self) -> Option<RawFd> {
        Some(net::Tap::fd(self))
    }

    fn set_offloads(&mut self, acked: u64) -> io::Result<()> {
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        // Like Cloud Hypervisor and Firecracker: the TAP may only produce what the guest
        // acked (GUEST_CSUM -> TUN_F_CSUM, GUEST_TSO4 -> TUN_F_TSO4, ...).
        let offloads = net::TapOffloads {
            csum: has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            tso_ecn: has(VIRTIO_NET_F_GUEST_ECN),
            ufo: false,
        };
        net::Tap::set_offloads(self, offloads).map_err(io::Error::other)
    }

    fn try_clone_box(&self) -> io::Result<Box<dyn NetBackend>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// Worker token of the TAP.
const TOKEN_TAP: u32 = 0;
/// Worker token of the "more receive work" eventfd.
const TOKEN_RX_MORE: u32 = 1;
/// Worker token of the receive rate limiter's timer.
const TOKEN_RX_LIMITER: u32 = 2;
/// Worker token of the transmit rate limiter's timer.
const TOKEN_TX_LIMITER: u32 = 3;
/// Frames moved per receive pass before yielding to other events.
const RX_BATCH: usize = 256;

/// `virtio_net_hdr` flags and GSO types (virtio 1.2 §5.1.6).
const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// What happened to the pending received frame.
enum Delivered {
    /// Written into guest buffers and published.
    Yes,
    /// The guest's buffers cannot hold it: dropped.
    Dropped,
    /// Not enough buffers now; the frame stays pending.
    NoBuffers,
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().fold(0u64, |a, s| a.saturating_add(s.len))
}

/// Copy the guest buffers `segs` into `buf` (which has their total length).
fn read_segments(mem: &GuestMemoryMmap, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut off = 0usize;
    for s in segs {
        let Ok(len) = usize::try_from(s.len) else {
            return false;
        };
        let Some(dst) = buf.get_mut(off..off.saturating_add(len)) else {
            return false;
        };
        if mem.read_slice(dst, s.addr).is_err() {
            return false;
        }
        off += len;
    }
    true
}

/// State the worker thread owns.
pub struct NetHandler {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Receive queue (0).
    pub rx: Arc<Mutex<Queue>>,
    /// Transmit queue (1).
    pub tx: Arc<Mutex<Queue>>,
    /// The host side.
    pub backend: Box<dyn NetBackend>,
    /// Counters.
    pub metrics: Arc<NetMetrics>,
    /// Interrupt sink.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Set when the driver broke a queue.
    pub needs_reset: Arc<AtomicBool>,
    /// Features the driver accepted.
    pub acked_features: u64,
    broken: bool,
    rx_buf: Vec<u8>,
    /// Length of the frame waiting in `rx_buf` (0: none).
    rx_pending: usize,
    /// The pending frame was charged to the receive limiter.
    rx_charged: bool,
    /// Receive limit (frames into the guest).
    rx_limiter: Option<SharedRateLimiter>,
    /// Transmit limit (frames from the guest).
    tx_limiter: Option<SharedRateLimiter>,
    /// Used entries published on the receive queue since the last notification check.
    rx_added: Wrapping<u16>,
    rx_more: EventFd,
    tx_buf: Vec<u8>,
}

impl NetHandler {
    /// A handler serving `rx`/`tx` with `backend`.
    #[allow(clippy::too_many_arguments)] // One field each; a builder would add nothing.
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Arc<Mutex<Queue>>,
        tx: Arc<Mutex<Queue>>,
        backend: Box<dyn NetBackend>,
        metrics: Arc<NetMetrics>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: Arc<AtomicBool>,
        acked_features: u64,
    ) -> io::Result<Self> {
        Ok(Self {
            mem,
            rx,
            tx,
            backend,
            metrics,
            interrupt,
            needs_reset,
            acked_features,
            broken: false,
            rx_buf: vec![0; MAX_FRAME_BUF],
            rx_pending: 0,
            rx_charged: false,
            rx_limiter: None,
            tx_limiter: None,
            rx_added: Wrapping(0),
            rx_more: EventFd::new(EFD_NONBLOCK)?,
            tx_buf: vec![0; MAX_FRAME_BUF],
        })
    }

    /// Limit received (`rx`) and transmitted (`tx`) frames; the limiters are kept by the
    /// caller across device re-creations and changed live through their `update`.
    pub fn with_rate_limiters(
        mut self,
        rx: Option<SharedRateLimiter>,
        tx: Option<SharedRateLimiter>,
    ) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    fn mark_broken(&mut self, why: &str) {
        tracing::warn!("virtio-net: queue broken by the driver: {why}; device needs reset");
        self.broken = true;
        NetMetrics::add(&self.metrics.broken_queues, 1);
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.trigger(InterruptKind::Config);
    }

    /// Publish `used` on the receive queue with a single used-index update, so the driver
    /// never sees part of a merged frame (Linux's receive_mergeable() drops a frame whose
    /// later buffers are not yet in the used ring: "rx error: %d buffers missing").
    fn publish_rx(&mut self, q: &mut Queue, used: &[(u16, u32)]) -> Result<(), &'static str> {
        let size = q.size();
        let base = GuestAddress(q.used_ring());
        let mut next = Wrapping(q.next_used());
        for &(head, len) in used {
            if head >= size {
                return Err("descriptor head out of range");
            }
            let off = 4 + u64::from(next.0 % size) * 8;
            let addr = base.checked_add(off).ok_or("used ring address overflows")?;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            self.mem
                .write_slice(&elem, addr)
                .map_err(|_| "cannot write used ring entry")?;
            next += Wrapping(1);
        }
        fence(Ordering::Release);
        let idx_addr = base.checked_add(2).ok_or("used ring address overflows")?;
        self.mem
            .store(next.0.to_le(), idx_addr, Ordering::Release)
            .map_err(|_| "cannot write used index")?;
        q.set_next_used(next.0);
        // `used` holds at most the queue size entries.
        self.rx_added += Wrapping(used.len() as u16);
        Ok(())
    }

    /// Whether the receive queue's new used entries need an interrupt (EVENT_IDX rules as in
    /// virtio-queue's needs_notification, with our own count of added entries).
    fn rx_needs_notification(&mut self, q: &Queue) -> Result<bool, &'static str> {
        fence(Ordering::SeqCst);
        let added = std::mem::replace(&mut self.rx_added, Wrapping(0));
        if !q.event_idx_enabled() {
            return Ok(true);
        }
        let addr = GuestAddress(q.avail_ring())
            .checked_add(4 + 2 * u64::from(q.size()))
            .ok_or("avail ring address overflows")?;
        let used_event: u16 = self
            .mem
            .load(addr, Ordering::Acquire)
            .map_err(|_| "cannot read used_event")?;
        let new = Wrapping(q.next_used());
        let old = new - added;
        Ok(new - Wrapping(u16::from_le(used_event)) - Wrapping(1) < new - old)
    }

    /// Put the pending frame into guest buffers.
    fn deliver(&mut self, q: &mut Queue) -> Result<Delivered, &'static str> {
        let frame_len = self.rx_pending;
        let mrg = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let mut chains: Vec<(u16, Vec<Segment>, u64)> = Vec::new();
        let mut room = 0u64;
        while room < frame_len as u64 {
            let avail = q
                .avail_idx(&self.mem, Ordering::Acquire)
                .map_err(|_| "cannot read avail index")?;
            let pending = avail - Wrapping(q.next_avail());
            if pending.0 > q.size() {
                return Err("avail index runs ahead of the queue size");
            }
            if pending.0 == 0 {
                for _ in &chains {
                    q.go_to_previous_position();
                }
                return Ok(Delivered::NoBuffers);
            }
            let chain = q
                .pop_descriptor_chain(&self.mem)
                .ok_or("cannot read avail ring entry")?;
            let head = chain.head_index();
            let parsed = parse_chain(chain).map_err(|_| "malformed descriptor chain")?;
            if !parsed.readable.is_empty() {
                return Err("receive buffer is device-readable");
            }
            let cap = total(&parsed.writable);
            let first = chains.is_empty();
            if (first && cap < VNET_HDR_LEN as u64) || (!mrg && cap < frame_len as u64) {
                // virtio 1.2 §5.1.6.3.1: without MRG_RXBUF one buffer holds the whole
                // frame. Keep the buffer for a frame that fits; drop this one.
                for _ in 0..=chains.len() {
                    q.go_to_previous_position();
                }
                return Ok(Delivered::Dropped);
            }
            room = room.saturating_add(cap);
            chains.push((head, parsed.writable, cap));
        }
        // num_buffers (virtio 1.2 §5.1.6.4): how many buffers the frame spans; at most the
        // queue size, so it fits.
        let num_buffers = chains.len() as u16;
        self.rx_buf[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        let mut used = Vec::with_capacity(chains.len());
        let mut off = 0usize;
        for (head, segs, cap) in &chains {
            let take = usize::try_from(*cap)
                .unwrap_or(usize::MAX)
                .min(frame_len - off);
            let (written, ok) = write_segments(&self.mem, segs, &self.rx_buf[off..off + take]);
            if !ok {
                NetMetrics::add(&self.metrics.rx_errors, 1);
                return Err("receive buffer outside guest memory");
            }
            off += written;
            // `written` <= the chain's u32-bounded capacity.
            used.push((*head, written as u32));
        }
        self.publish_rx(q, &used)?;
        Ok(Delivered::Yes)
    }

    /// Move frames from the TAP into the guest until the TAP is empty, the guest has no
    /// buffers (then the TAP is left unread until the driver posts some: the kernel queues
    /// or drops, and nothing spins), or a batch is done.
    pub fn process_rx(&mut self) {
        if self.broken {
            return;
        }
        let rxq = self.rx.clone();
        let mut q = rxq.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return;
        }
        let mut published = false;
        let mut moved = 0usize;
        loop {
            if moved >= RX_BATCH {
                // Come back after other events: the TAP may still hold frames.
                let _ = self.rx_more.write(1);
                break;
            }
            if self.rx_pending == 0 {
                match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        NetMetrics::add(&self.metrics.rx_errors, 1);
                        moved += 1;
                        continue;
                    }
                    Ok(n) => self.rx_pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: TAP read failed: {e}");
                        NetMetrics::add(&self.metrics.rx_errors, 1);
                        break;
                    }
                }
            }
            let bytes = (self.rx_pending - VNET_HDR_LEN) as u64;
            if !self.rx_charged {
                if let Some(l) = &self.rx_limiter {
                    if !l.consume_request(bytes, 1) {
                        // The frame waits here; the limiter's timer resumes receiving.
                        NetMetrics::add(&self.metrics.rx_throttled, 1);
                        break;
                    }
                }
                self.rx_charged = true;
            }
            match self.deliver(&mut q) {
                Ok(Delivered::Yes) => {
                    self.rx_pending = 0;
                    self.rx_charged = false;
                    moved += 1;
                    published = true;
                    NetMetrics::add(&self.metrics.rx_packets, 1);
                    NetMetrics::add(&self.metrics.rx_bytes, bytes);
                }
                Ok(Delivered::Dropped) => {
                    self.rx_pending = 0;
                    self.rx_charged = false;
                    moved += 1;
                    NetMetrics::add(&self.metrics.rx_dropped, 1);
                }
                Ok(Delivered::NoBuffers) => match q.enable_notification(&self.mem) {
                    // Buffers arrived meanwhile: try again.
                    Ok(true) => continue,
                    Ok(false) => {
                        NetMetrics::add(&self.metrics.rx_no_buffers, 1);
                        break;
                    }
                    Err(_) => {
                        drop(q);
                        self.mark_broken("cannot write avail_event");
                        return;
                    }
                },
                Err(why) => {
                    drop(q);
                    self.mark_broken(why);
                    return;
                }
            }
        }
        if !published {
            return;
        }
        match self.rx_needs_notification(&q) {
            Ok(true) => {
                NetMetrics::add(&self.metrics.interrupts, 1);
                self.interrupt.trigger(InterruptKind::Queue(0));
            }
            Ok(false) => {}
            Err(why) => {
                drop(q);
                self.mark_broken(why);
            }
        }
    }

    /// Check a guest frame's header against the negotiated features; None if acceptable.
    fn tx_header_problem(&self, hdr: &[u8]) -> Option<&'static str> {
        let flags = hdr[0];
        let gso = hdr[1];
        if flags & HDR_F_NEEDS_CSUM != 0 && !self.acked(VIRTIO_NET_F_CSUM) {
            return Some("partial checksum without CSUM");
        }
        if gso & GSO_ECN != 0 && !self.acked(VIRTIO_NET_F_HOST_ECN) {
            return Some("ECN segmentation without HOST_ECN");
        }
        match gso & !GSO_ECN {
            GSO_NONE => None,
            GSO_TCPV4 if self.acked(VIRTIO_NET_F_HOST_TSO4) => None,
            GSO_TCPV6 if self.acked(VIRTIO_NET_F_HOST_TSO6) => None,
            _ => Some("segmentation type not negotiated"),
        }
    }

    /// Send one transmit chain to the TAP.
    fn send(&mut self, readable: &[Segment], bad_layout: bool) {
        let m = self.metrics.clone();
        let drop_err = |why: &str| {
            tracing::debug!("virtio-net: dropped guest frame: {why}");
            NetMetrics::add(&m.tx_errors, 1);
            NetMetrics::add(&m.tx_dropped, 1);
        };
        if bad_layout {
            drop_err("transmit buffer is device-writable");
            return;
        }
        let len = total(readable);
        if len < VNET_HDR_LEN as u64 || len > MAX_FRAME_BUF as u64 {
            drop_err("frame size out of range");
            return;
        }
        // Bounded by MAX_FRAME_BUF just above.
        let len = len as usize;
        if !read_segments(&self.mem, readable, &mut self.tx_buf[..len]) {
            drop_err("transmit buffer outside guest memory");
            return;
        }
        if let Some(why) = self.tx_header_problem(&self.tx_buf[..VNET_HDR_LEN]) {
            drop_err(why);
            return;
        }
        // num_buffers is reserved on transmit (virtio 1.2 §5.1.6.2).
        self.tx_buf[10..12].fill(0);
        match self.backend.write_frame(&self.tx_buf[..len]) {
            Ok(n) if n == len => {
                NetMetrics::add(&self.metrics.tx_packets, 1);
                NetMetrics::add(&self.metrics.tx_bytes, (len - VNET_HDR_LEN) as u64);
            }
            Ok(_) => drop_err("short TAP write"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The TAP's queue is full: a NIC drops here too.
                NetMetrics::add(&self.metrics.tx_dropped, 1);
            }
            Err(e) => {
                tracing::debug!("virtio-net: TAP write failed: {e}");
                NetMetrics::add(&self.metrics.tx_errors, 1);
                NetMetrics::add(&self.metrics.tx_dropped, 1);
            }
        }
    }

    fn drain_tx(&mut self, q: &mut Queue) -> Result<bool, &'static str> {
        let mut used_any = false;
        loop {
            q.disable_notification(&self.mem)
                .map_err(|_| "cannot write used ring flags")?;
            loop {
                let avail = q
                    .avail_idx(&self.mem, Ordering::Acquire)
                    .map_err(|_| "cannot read avail index")?;
                let pending = avail - Wrapping(q.next_avail());
                if pending.0 == 0 {
                    break;
                }
                if pending.0 > q.size() {
                    return Err("avail index runs ahead of the queue size");
                }
                let chain = q
                    .pop_descriptor_chain(&self.mem)
                    .ok_or("cannot read avail ring entry")?;
                let head = chain.head_index();
                let parsed = parse_chain(chain).map_err(|_| "malformed descriptor chain")?;
                if let Some(l) = &self.tx_limiter {
                    let bytes = total(&parsed.readable).saturating_sub(VNET_HDR_LEN as u64);
                    if !l.consume_request(bytes, 1) {
                        // Sent once the limiter's timer fires.
                        q.go_to_previous_position();
                        NetMetrics::add(&self.metrics.tx_throttled, 1);
                        return Ok(used_any);
                    }
                }
                let bad = !parsed.writable.is_empty() || parsed.misordered;
                self.send(&parsed.readable, bad);
                q.add_used(&self.mem, head, 0)
                    .map_err(|_| "cannot add used entry")?;
                used_any = true;
            }
            if !q
                .enable_notification(&self.mem)
                .map_err(|_| "cannot write used ring flags")?
            {
                break;
            }
        }
        Ok(used_any)
    }

    /// Send everything the driver made available on the transmit queue.
    pub fn process_tx(&mut self) {
        if self.broken {
            return;
        }
        let txq = self.tx.clone();
        let mut q = txq.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return;
        }
        let used_any = match self.drain_tx(&mut q) {
            Ok(u) => u,
            Err(why) => {
                drop(q);
                self.mark_broken(why);
                return;
            }
        };
        if !used_any {
            return;
        }
        match q.needs_notification(&self.mem) {
            Ok(true) => {
                NetMetrics::add(&self.metrics.interrupts, 1);
                self.interrupt.trigger(InterruptKind::Queue(1));
            }
            Ok(false) => {}
            Err(_) => {
                drop(q);
                self.mark_broken("cannot read used_event");
            }
        }
    }
}

impl QueueHandler for NetHandler {
    fn process_queue(&mut self, index: usize) {
        match index {
            0 => self.process_rx(),
            1 => self.process_tx(),
            _ => {}
        }
    }

    fn register(&mut self, ctl: &EventControl<'_>) -> io::Result<()> {
        if let Some(fd) = self.backend.fd() {
            // Edge-triggered: the TAP is read until it is empty or the guest runs out of
            // buffers; a guest kick on the receive queue resumes reading.
            ctl.add(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP)?;
        }
        ctl.add(self.rx_more.as_raw_fd(), EventSet::IN, TOKEN_RX_MORE)?;
        if let Some(l) = &self.rx_limiter {
            ctl.add(l.timer_fd(), EventSet::IN, TOKEN_RX_LIMITER)?;
        }
        if let Some(l) = &self.tx_limiter {
            ctl.add(l.timer_fd(), EventSet::IN, TOKEN_TX_LIMITER)?;
        }
        Ok(())
    }

    fn process_event(&mut self, token: u32, _events: EventSet, _ctl: &EventControl<'_>) {
        match token {
            TOKEN_TAP => self.process_rx(),
            TOKEN_RX_MORE => {
                let _ = self.rx_more.read();
                self.process_rx();
            }
            TOKEN_RX_LIMITER => {
                if let Some(l) = &self.rx_limiter {
                    if let Err(e) = l.timer_event() {
                        tracing::warn!("virtio-net: receive rate limiter timer: {e}");
                    }
                }
                self.process_rx();
            }
            TOKEN_TX_LIMITER => {
                if let Some(l) = &self.tx_limiter {
                    if let Err(e) = l.timer_event() {
                        tracing::warn!("virtio-net: transmit rate limiter timer: {e}");
                    }
                }
                self.process_tx();
            }
            _ => {}
        }
    }
}
