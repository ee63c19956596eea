//! The guest side of the multiplexer: packets from the TX queue (validated, then handed to
//! their connection or answered with RST), packets for the RX queue (from the per-connection
//! pending state, never queued beyond it), the event queue, and interrupts.

use std::ffi::OsString;
use std::sync::atomic::Ordering;

use virtio_queue::{QueueOwnedT, QueueT};

use super::super::chain::{self, parse_chain, ParsedChain};
use super::super::connection::{ConnKey, ConnState, Connection, RxPacket};
use super::super::hostsock::connect_nonblocking;
use super::super::metrics::VsockMetrics;
use super::super::packet::{op, validate_tx, Header, Reject, HDR_LEN, MAX_PKT_PAYLOAD};
use super::{VsockHandler, EVENT_TRANSPORT_RESET, EVQ, RXQ, TXQ};
use crate::device::InterruptKind;

impl VsockHandler {
    // ---- guest → host -------------------------------------------------------------------

    pub(super) fn process_tx(&mut self) {
        let queue = self.queues[TXQ].clone();
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return;
        }
        let mem = self.mem.clone();
        let r: Result<(), &'static str> = (|| loop {
            q.disable_notification(&mem)
                .map_err(|_| "cannot write used ring flags")?;
            loop {
                let avail = q
                    .avail_idx(&mem, Ordering::Acquire)
                    .map_err(|_| "cannot read avail index")?;
                let pending = avail - std::num::Wrapping(q.next_avail());
                if pending.0 == 0 {
                    break;
                }
                if pending.0 > q.size() {
                    return Err("avail index runs ahead of the queue size");
                }
                let chain = q
                    .pop_descriptor_chain(&mem)
                    .ok_or("cannot read avail ring entry")?;
                let head = chain.head_index();
                let parsed = parse_chain(chain).map_err(|_| "malformed descriptor chain")?;
                self.handle_tx_chain(&parsed);
                q.add_used(&mem, head, 0)
                    .map_err(|_| "cannot add used entry")?;
                self.used[TXQ] = true;
                if self.broken {
                    return Ok(());
                }
            }
            if !q
                .enable_notification(&mem)
                .map_err(|_| "cannot write used ring flags")?
            {
                return Ok(());
            }
        })();
        drop(q);
        if let Err(why) = r {
            self.mark_broken(why);
        }
    }

    pub(super) fn handle_tx_chain(&mut self, parsed: &ParsedChain) {
        VsockMetrics::add(&self.metrics.tx_packets, 1);
        let total = chain::total(&parsed.readable);
        let mut hb = [0u8; HDR_LEN];
        if total < HDR_LEN || chain::read(&self.mem, &parsed.readable, 0, &mut hb).is_err() {
            VsockMetrics::add(&self.metrics.tx_dropped, 1);
            return;
        }
        let hdr = Header::from_bytes(&hb);
        match validate_tx(&hdr, self.host.guest_cid, total - HDR_LEN) {
            Err(Reject::Drop) => {
                VsockMetrics::add(&self.metrics.tx_dropped, 1);
            }
            Err(Reject::Reset) => self.reject(&hdr),
            Ok(()) => {
                let len = hdr.len as usize;
                let mut payload = std::mem::take(&mut self.tx_scratch);
                if chain::read(&self.mem, &parsed.readable, HDR_LEN, &mut payload[..len]).is_err() {
                    self.tx_scratch = payload;
                    self.reject(&hdr);
                    return;
                }
                VsockMetrics::add(&self.metrics.tx_bytes, len as u64);
                self.on_guest_packet(&hdr, &payload[..len]);
                self.tx_scratch = payload;
            }
        }
    }

    /// A well-addressed packet the device cannot accept: reset its connection.
    pub(super) fn reject(&mut self, hdr: &Header) {
        VsockMetrics::add(&self.metrics.tx_rejected, 1);
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(c) = self.conns.get_mut(&key) {
            c.reset();
            VsockMetrics::add(&self.metrics.resets, 1);
            self.touched(key);
        } else if hdr.op != op::RST {
            self.queue_rst(key);
        }
    }

    pub(super) fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(c) = self.conns.get_mut(&key) {
            let was_local_init = c.info.state == ConnState::LocalInit;
            if c.on_guest_packet(hdr, payload) {
                VsockMetrics::add(&self.metrics.credit_violations, 1);
            }
            if hdr.op == op::RST || c.info.state == ConnState::Closing {
                VsockMetrics::add(&self.metrics.resets, 1);
            }
            if was_local_init && c.info.state == ConnState::Established {
                VsockMetrics::add(&self.metrics.host_connections, 1);
            }
            self.touched(key);
            return;
        }
        match hdr.op {
            op::REQUEST => self.guest_connect(key, hdr),
            op::RST => {}
            _ => {
                VsockMetrics::add(&self.metrics.tx_rejected, 1);
                self.queue_rst(key);
            }
        }
    }

    /// The guest connects to host port `key.local_port`: connect to `<path>_<port>`.
    pub(super) fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        let mut path: OsString = self.host.path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        let stream = if self.at_capacity() {
            None
        } else {
            match connect_nonblocking(&path) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::debug!("virtio-vsock: guest connect to {path:?} failed: {e}");
                    None
                }
            }
        };
        let token = stream.as_ref().and_then(|_| self.alloc_token());
        let (Some(stream), Some(token)) = (stream, token) else {
            VsockMetrics::add(&self.metrics.guest_connect_refused, 1);
            self.queue_rst(key);
            return;
        };
        let conn = Connection::new_guest_initiated(token, key, stream, self.host.guest_cid, hdr);
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        VsockMetrics::add(&self.metrics.guest_connections, 1);
        self.update_gauge();
        self.touched(key);
    }

    // ---- host → guest -------------------------------------------------------------------

    /// The next packet owed to the guest, its payload (if any) in `scratch`.
    pub(super) fn next_rx_packet(&mut self, space: usize) -> Option<Header> {
        if let Some(h) = self.rst_q.pop_front() {
            return Some(h);
        }
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_rxq = false;
            let pkt = match c.next_packet(space, &mut self.scratch) {
                RxPacket::None => None,
                RxPacket::Control(h) | RxPacket::Data(h) => Some(h),
            };
            self.touched(key);
            if let Some(h) = pkt {
                if h.op == op::RST {
                    VsockMetrics::add(&self.metrics.resets, 1);
                }
                return Some(h);
            }
        }
        None
    }

    pub(super) fn process_rx(&mut self) {
        // A transport reset owed to the guest goes first: a packet delivered before it would
        // belong to a connection the reset then ends.
        self.process_event_queue();
        if self.broken || (self.rst_q.is_empty() && self.rxq.is_empty()) {
            return;
        }
        let queue = self.queues[RXQ].clone();
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return;
        }
        let mem = self.mem.clone();
        let r: Result<(), &'static str> = (|| loop {
            if self.rst_q.is_empty() && self.rxq.is_empty() {
                return Ok(());
            }
            let avail = q
                .avail_idx(&mem, Ordering::Acquire)
                .map_err(|_| "cannot read avail index")?;
            let pending = avail - std::num::Wrapping(q.next_avail());
            if pending.0 == 0 {
                // Out of RX buffers: ask to be told when the driver adds some.
                if q.enable_notification(&mem)
                    .map_err(|_| "cannot write used ring flags")?
                {
                    continue;
                }
                return Ok(());
            }
            if pending.0 > q.size() {
                return Err("avail index runs ahead of the queue size");
            }
            let chain = q
                .pop_descriptor_chain(&mem)
                .ok_or("cannot read avail ring entry")?;
            let head = chain.head_index();
            let parsed = parse_chain(chain).map_err(|_| "malformed descriptor chain")?;
            let total = chain::total(&parsed.writable);
            if total < HDR_LEN || !chain::all_valid(&mem, &parsed.writable) {
                VsockMetrics::add(&self.metrics.rx_bad_buffers, 1);
                q.add_used(&mem, head, 0)
                    .map_err(|_| "cannot add used entry")?;
                self.used[RXQ] = true;
                continue;
            }
            let space = (total - HDR_LEN).min(MAX_PKT_PAYLOAD as usize);
            let Some(hdr) = self.next_rx_packet(space) else {
                // Nothing to send after all (sockets had no data): keep the buffer.
                q.go_to_previous_position();
                return Ok(());
            };
            let len = hdr.len as usize;
            let ok = chain::write(&mem, &parsed.writable, 0, &hdr.to_bytes()).is_ok()
                && chain::write(&mem, &parsed.writable, HDR_LEN, &self.scratch[..len]).is_ok();
            let used_len = if ok { (HDR_LEN + len) as u32 } else { 0 };
            q.add_used(&mem, head, used_len)
                .map_err(|_| "cannot add used entry")?;
            self.used[RXQ] = true;
            VsockMetrics::add(&self.metrics.rx_packets, 1);
            if hdr.op == op::RW {
                VsockMetrics::add(&self.metrics.rx_bytes, len as u64);
            }
        })();
        drop(q);
        if let Err(why) = r {
            self.mark_broken(why);
        }
    }

    pub(super) fn process_event_queue(&mut self) {
        if self.broken || !self.event_pending {
            return;
        }
        let queue = self.queues[EVQ].clone();
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return;
        }
        let mem = self.mem.clone();
        let r: Result<(), &'static str> = (|| loop {
            let avail = q
                .avail_idx(&mem, Ordering::Acquire)
                .map_err(|_| "cannot read avail index")?;
            let pending = avail - std::num::Wrapping(q.next_avail());
            if pending.0 == 0 {
                if q.enable_notification(&mem)
                    .map_err(|_| "cannot write used ring flags")?
                {
                    continue;
                }
                return Ok(());
            }
            if pending.0 > q.size() {
                return Err("avail index runs ahead of the queue size");
            }
            let chain = q
                .pop_descriptor_chain(&mem)
                .ok_or("cannot read avail ring entry")?;
            let head = chain.head_index();
            let parsed = parse_chain(chain).map_err(|_| "malformed descriptor chain")?;
            let ok = chain::write(
                &mem,
                &parsed.writable,
                0,
                &EVENT_TRANSPORT_RESET.to_le_bytes(),
            )
            .is_ok();
            q.add_used(&mem, head, if ok { 4 } else { 0 })
                .map_err(|_| "cannot add used entry")?;
            self.used[EVQ] = true;
            if ok {
                self.event_pending = false;
                VsockMetrics::add(&self.metrics.transport_resets, 1);
                return Ok(());
            }
        })();
        drop(q);
        if let Err(why) = r {
            self.mark_broken(why);
        }
    }

    /// Drop every connection and tell the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).
    pub(super) fn transport_reset(&mut self) {
        self.drop_all();
        self.event_pending = true;
        self.process_event_queue();
    }

    pub(super) fn notify(&mut self) {
        for (i, used) in self.used.iter_mut().enumerate() {
            if !std::mem::take(used) {
                continue;
            }
            let mut q = self.queues[i].lock().unwrap_or_else(|e| e.into_inner());
            if q.needs_notification(&self.mem).unwrap_or(true) {
                VsockMetrics::add(&self.metrics.interrupts, 1);
                self.interrupt.trigger(InterruptKind::Queue(i as u16));
            }
        }
    }
}
