//! One vsock stream connection between a guest port and a host AF_UNIX socket: the protocol
//! state machine, credit accounting (virtio 1.2 §5.10.6.3) and the bounded guest→host buffer.
//!
//! Credit: every packet carries the sender's `buf_alloc` and `fwd_cnt`. The guest may have at
//! most `buf_alloc - (rx_cnt - fwd_cnt)` bytes in flight towards us; we never send it more
//! than `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`. Counters are u32 and wrap, as in Linux.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};
use crate::EventSet;

/// Receive buffer we advertise per connection (`buf_alloc`): the most guest→host bytes one
/// connection may hold while the host peer is not reading.
pub const BUF_ALLOC: u32 = 128 * 1024;

/// Identifies a connection: the host-side port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnKey {
    /// Port on the host side (CID 2): the guest's destination port for guest-initiated
    /// connections, the ephemeral port Ferrite assigned for host-initiated ones.
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

/// Protocol state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows (possibly half-closed, see the shutdown flags).
    Established,
    /// Reset: the host socket is closed, a RST to the guest is queued; removed once sent.
    Closing,
    /// Over: remove without telling the guest anything more.
    Gone,
}

/// Control packets waiting for a guest RX buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOps {
    /// VSOCK_OP_REQUEST (host-initiated connection).
    pub request: bool,
    /// VSOCK_OP_RESPONSE (guest-initiated connection accepted).
    pub response: bool,
    /// VSOCK_OP_CREDIT_UPDATE (any packet carries the same information).
    pub credit_update: bool,
    /// The host socket has (or may have) data or EOF to read.
    pub data: bool,
}

/// Everything about a connection except its host socket and buffered bytes: what a snapshot
/// can describe. Host sockets cannot be saved, so on restore connections are reset (the
/// device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), as Firecracker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// Ports.
    pub key: ConnKey,
    /// Protocol state.
    pub state: ConnState,
    /// Whether the host side opened the connection (`CONNECT <port>`).
    pub host_initiated: bool,
    /// Payload bytes received from the guest, ever (wrapping).
    pub rx_cnt: u32,
    /// Of those, bytes written to the host socket (our `fwd_cnt`).
    pub fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard from us.
    pub last_fwd_cnt_sent: u32,
    /// Payload bytes sent to the guest, ever (wrapping).
    pub tx_cnt: u32,
    /// The guest's receive buffer size.
    pub peer_buf_alloc: u32,
    /// The guest's forwarded count.
    pub peer_fwd_cnt: u32,
    /// The guest will send no more data.
    pub peer_shut_send: bool,
    /// The guest will receive no more data.
    pub peer_shut_recv: bool,
    /// The host peer will send no more data (EOF read; SHUTDOWN(SEND) sent to the guest).
    pub host_eof: bool,
    /// We shut down writing on the host socket (the guest's SHUTDOWN(SEND) was forwarded).
    pub host_write_shut: bool,
    /// A CREDIT_REQUEST went out and no credit arrived since.
    pub credit_requested: bool,
    /// Control packets owed to the guest.
    pub pending: PendingOps,
    /// Guest→host bytes buffered because the host peer is not reading.
    pub buffered: u32,
}

/// What [`Connection::next_packet`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum RxPacket {
    /// Nothing to send now.
    None,
    /// A header-only packet.
    Control(Header),
    /// A RW packet whose `hdr.len` payload bytes are at the start of the scratch buffer.
    Data(Header),
}

/// A live connection.
pub struct Connection {
    /// Epoll token of the host socket.
    pub token: u32,
    /// Protocol view.
    pub info: ConnectionInfo,
    /// The host socket (None once reset).
    stream: Option<UnixStream>,
    /// Guest→host bytes not yet written to the host socket (at most BUF_ALLOC, plus the
    /// "OK" line at the front of a host-initiated connection).
    tx_buf: VecDeque<u8>,
    /// Bytes at the front of `tx_buf` that are not guest payload (the "OK" line).
    preamble: usize,
    /// The host socket hung up: it is out of the epoll set, reads and writes drive it.
    pub hup: bool,
    /// Events currently registered (None: not in the epoll set).
    pub registered: Option<EventSet>,
    /// Queued in the muxer's RX list.
    pub in_rxq: bool,
    /// When a host-initiated request was sent (for its timeout).
    pub since: Instant,
    guest_cid: u64,
}

impl Connection {
    fn new(
        token: u32,
        key: ConnKey,
        stream: UnixStream,
        guest_cid: u64,
        host_initiated: bool,
    ) -> Self {
        Self {
            token,
            info: ConnectionInfo {
                key,
                state: if host_initiated {
                    ConnState::LocalInit
                } else {
                    ConnState::Established
                },
                host_initiated,
                rx_cnt: 0,
                fwd_cnt: 0,
                last_fwd_cnt_sent: 0,
                tx_cnt: 0,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                peer_shut_send: false,
                peer_shut_recv: false,
                host_eof: false,
                host_write_shut: false,
                credit_requested: false,
                pending: PendingOps {
                    request: host_initiated,
                    response: !host_initiated,
                    ..PendingOps::default()
                },
                buffered: 0,
            },
            stream: Some(stream),
            tx_buf: VecDeque::new(),
            preamble: 0,
            hup: false,
            registered: None,
            in_rxq: false,
            since: Instant::now(),
            guest_cid,
        }
    }

    /// A connection the host opened with `CONNECT <port>`: a REQUEST is owed to the guest.
    pub fn new_host_initiated(token: u32, key: ConnKey, stream: UnixStream, cid: u64) -> Self {
        Self::new(token, key, stream, cid, true)
    }

    /// A connection the guest asked for (REQUEST `hdr`) and the host accepted: a RESPONSE is
    /// owed to the guest.
    pub fn new_guest_initiated(
        token: u32,
        key: ConnKey,
        stream: UnixStream,
        cid: u64,
        hdr: &Header,
    ) -> Self {
        let mut c = Self::new(token, key, stream, cid, false);
        c.update_peer_credit(hdr);
        c
    }

    /// The host socket, while open.
    pub fn stream(&self) -> Option<&UnixStream> {
        self.stream.as_ref()
    }

    /// Whether the connection should be forgotten now.
    pub fn is_gone(&self) -> bool {
        self.info.state == ConnState::Gone
    }

    /// Close the host socket and queue a RST for the guest.
    pub fn reset(&mut self) {
        self.stream = None;
        self.tx_buf = VecDeque::new();
        self.info.buffered = 0;
        if self.info.state != ConnState::Gone {
            self.info.state = ConnState::Closing;
        }
    }

    /// Close the host socket; nothing more goes to the guest.
    pub fn close(&mut self) {
        self.stream = None;
        self.tx_buf = VecDeque::new();
        self.info.buffered = 0;
        self.info.state = ConnState::Gone;
    }

    /// Credit the guest still gives us.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.info.tx_cnt.wrapping_sub(self.info.peer_fwd_cnt);
        self.info.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        let changed =
            hdr.buf_alloc != self.info.peer_buf_alloc || hdr.fwd_cnt != self.info.peer_fwd_cnt;
        self.info.peer_buf_alloc = hdr.buf_alloc;
        self.info.peer_fwd_cnt = hdr.fwd_cnt;
        if changed {
            self.info.credit_requested = false;
        }
    }

    fn can_read_host(&self) -> bool {
        self.info.state == ConnState::Established
            && self.stream.is_some()
            && !self.info.host_eof
            && !self.info.peer_shut_recv
    }

    /// Whether a packet is owed to the guest (so the connection belongs in the RX list).
    pub fn has_pending_rx(&self) -> bool {
        let p = &self.info.pending;
        match self.info.state {
            ConnState::Closing => true,
            ConnState::Gone => false,
            ConnState::LocalInit => p.request,
            ConnState::Established => {
                p.response
                    || p.credit_update
                    || (p.data
                        && self.can_read_host()
                        && (self.peer_free() > 0 || !self.info.credit_requested))
            }
        }
    }

    /// The epoll events the host socket should be watched for (None: not at all).
    pub fn desired_events(&self) -> Option<EventSet> {
        self.stream.as_ref()?;
        if self.hup {
            return None;
        }
        let mut ev = EventSet::empty();
        if self.info.state == ConnState::Established
            && self.can_read_host()
            && !self.info.pending.data
        {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        Some(ev)
    }

    fn header(&self, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.info.key.local_port,
            dst_port: self.info.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.info.fwd_cnt,
        }
    }

    /// A packet from the guest for this connection (validated by `packet::validate_tx`).
    /// Returns true if the guest sent more than its credit allowed (the connection is reset).
    pub fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) -> bool {
        if matches!(self.info.state, ConnState::Closing | ConnState::Gone) {
            if hdr.op == op::RST {
                self.close();
            }
            return false;
        }
        self.update_peer_credit(hdr);
        match (self.info.state, hdr.op) {
            (_, op::RST) => self.close(),
            (ConnState::LocalInit, op::RESPONSE) => {
                self.info.state = ConnState::Established;
                self.info.pending.request = false;
                // Firecracker's hybrid vsock acknowledgement: "OK <assigned host port>\n".
                let ok = format!("OK {}\n", self.info.key.local_port);
                self.tx_buf.extend(ok.as_bytes());
                self.preamble = ok.len();
                // Data the host client wrote before the acknowledgement is still unread.
                self.info.pending.data = true;
                self.flush_to_host();
            }
            (ConnState::Established, op::RW) => {
                if self.info.peer_shut_send {
                    self.reset();
                    return false;
                }
                let len = payload.len() as u32;
                let buffered = self.info.rx_cnt.wrapping_sub(self.info.fwd_cnt);
                if buffered.saturating_add(len) > BUF_ALLOC {
                    // The guest ignored our credit.
                    self.reset();
                    return true;
                }
                self.info.rx_cnt = self.info.rx_cnt.wrapping_add(len);
                self.tx_buf.extend(payload);
                self.flush_to_host();
            }
            (ConnState::Established, op::CREDIT_UPDATE) => {}
            (ConnState::Established, op::CREDIT_REQUEST) => self.info.pending.credit_update = true,
            (ConnState::Established, op::SHUTDOWN) => {
                if hdr.flags & shutdown::RCV != 0 {
                    self.info.peer_shut_recv = true;
                }
                if hdr.flags & shutdown::SEND != 0 {
                    self.info.peer_shut_send = true;
                }
                self.flush_to_host();
            }
            // REQUEST or RESPONSE on an established connection, anything but RESPONSE or RST
            // while waiting for the guest to accept: protocol error.
            _ => self.reset(),
        }
        false
    }

    /// Write buffered guest data to the host socket; then apply the guest's shutdown once the
    /// buffer is empty.
    pub fn flush_to_host(&mut self) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let mut written = 0usize;
        let mut failed = false;
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match stream.write(a) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    written += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > 2 * 4096 {
            self.tx_buf = VecDeque::new();
        }
        // The "OK" line is not guest payload; only count what the guest sent.
        let skipped = written.min(self.preamble);
        self.preamble -= skipped;
        let payload_written = written - skipped;
        self.info.fwd_cnt = self.info.fwd_cnt.wrapping_add(payload_written as u32);
        self.info.buffered = self.tx_buf.len() as u32;
        if failed {
            self.reset();
            return;
        }
        // Tell the guest about freed space once it believes less than half is free (so a
        // sender that ran out of credit always hears about progress).
        let unseen = self.info.fwd_cnt.wrapping_sub(self.info.last_fwd_cnt_sent);
        let seen_used = self.info.rx_cnt.wrapping_sub(self.info.last_fwd_cnt_sent);
        if unseen > 0 && BUF_ALLOC.saturating_sub(seen_used) < BUF_ALLOC / 2 {
            self.info.pending.credit_update = true;
        }
        if self.tx_buf.is_empty() {
            if self.info.peer_shut_send && self.info.peer_shut_recv {
                // The guest closed both directions and everything it sent is delivered: it
                // waits for our RST (Linux's virtio_transport_close).
                self.reset();
            } else if self.info.peer_shut_send && !self.info.host_write_shut {
                if let Some(s) = self.stream.as_ref() {
                    let _ = s.shutdown(Shutdown::Write);
                }
                self.info.host_write_shut = true;
            }
        }
    }

    /// Produce the next packet for the guest into an RX buffer with `space` payload bytes;
    /// data is read from the host socket into `scratch`.
    pub fn next_packet(&mut self, space: usize, scratch: &mut [u8]) -> RxPacket {
        let pkt = self.build_packet(space, scratch);
        match &pkt {
            RxPacket::Control(h) | RxPacket::Data(h) => {
                self.info.last_fwd_cnt_sent = h.fwd_cnt;
                self.info.pending.credit_update = false;
                self.info.tx_cnt = self.info.tx_cnt.wrapping_add(h.len);
                if h.op == op::RST {
                    self.info.state = ConnState::Gone;
                }
            }
            RxPacket::None => {}
        }
        pkt
    }

    fn build_packet(&mut self, space: usize, scratch: &mut [u8]) -> RxPacket {
        match self.info.state {
            ConnState::Gone => return RxPacket::None,
            ConnState::Closing => return RxPacket::Control(self.header(op::RST, 0, 0)),
            ConnState::LocalInit => {
                if self.info.pending.request {
                    self.info.pending.request = false;
                    return RxPacket::Control(self.header(op::REQUEST, 0, 0));
                }
                return RxPacket::None;
            }
            ConnState::Established => {}
        }
        if self.info.pending.response {
            self.info.pending.response = false;
            return RxPacket::Control(self.header(op::RESPONSE, 0, 0));
        }
        if self.info.pending.data && self.can_read_host() {
            let credit = self.peer_free() as usize;
            if credit == 0 {
                if !self.info.credit_requested {
                    self.info.credit_requested = true;
                    return RxPacket::Control(self.header(op::CREDIT_REQUEST, 0, 0));
                }
            } else {
                let n = space.min(credit).min(scratch.len());
                if let Some(pkt) = self.read_host(&mut scratch[..n]) {
                    return pkt;
                }
            }
        }
        if self.info.pending.credit_update {
            return RxPacket::Control(self.header(op::CREDIT_UPDATE, 0, 0));
        }
        RxPacket::None
    }

    fn read_host(&mut self, buf: &mut [u8]) -> Option<RxPacket> {
        if buf.is_empty() {
            return None;
        }
        let stream = self.stream.as_mut()?;
        loop {
            return match stream.read(buf) {
                Ok(0) => {
                    // The host peer shut down writing: half-close towards the guest. Linux's
                    // virtio_transport_recv_connected() then marks the peer SEND_SHUTDOWN (its
                    // reads return EOF, it may still write) and answers RST only once both
                    // SHUTDOWN flags arrived, so SEND alone keeps the other direction open.
                    self.info.pending.data = false;
                    self.info.host_eof = true;
                    Some(RxPacket::Control(self.header(
                        op::SHUTDOWN,
                        0,
                        shutdown::SEND,
                    )))
                }
                Ok(n) => Some(RxPacket::Data(self.header(op::RW, n as u32, 0))),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.info.pending.data = false;
                    None
                }
                Err(_) => {
                    self.reset();
                    Some(RxPacket::Control(self.header(op::RST, 0, 0)))
                }
            };
        }
    }
}
