//! The vsock worker: the connection multiplexer between the guest's virtqueues and host
//! AF_UNIX sockets (Firecracker's hybrid vsock), run on the device's worker thread.
//!
//! Every host socket (the listener, clients still sending their `CONNECT` line, connected
//! streams) is in the worker's epoll set under its own token. Socket readiness is level
//! triggered, so the interest set follows what the connection can do: EPOLLIN only while the
//! guest has credit and the socket is not already queued for reading (backpressure towards a
//! host peer when the guest stops reading), EPOLLOUT only while guest data waits for a slow
//! host peer. `process_queue` has no access to the epoll set, so changes made there are
//! recorded in `dirty` and applied on a self-kick.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_device::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, Connection, ConnectionInfo, BUF_ALLOC};
use super::metrics::VsockMetrics;
use super::packet::{op, Header, HOST_CID, MAX_PKT_PAYLOAD, TYPE_STREAM};
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::worker::{EventControl, EventSet, QueueHandler};

mod guest;
mod host;

/// RX queue index.
pub const RXQ: usize = 0;
/// TX queue index.
pub const TXQ: usize = 1;
/// Event queue index.
pub const EVQ: usize = 2;

/// Most connections (established or waiting for their handshake) per device.
pub const MAX_CONNECTIONS: usize = 512;
/// Most RSTs for unknown connections waiting for RX buffers; more are dropped.
const MAX_RST_QUEUE: usize = 256;
/// A host client must send its `CONNECT` line within this time.
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// The guest must answer a host-initiated REQUEST within this time (Firecracker: 2 s; more
/// here because guests under emulation are slow).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the timeouts above are checked while anything waits (the timer is off when
/// nothing does, so an idle device never wakes up).
const TICK: Duration = Duration::from_millis(500);
/// First ephemeral host port for host-initiated connections (as Firecracker).
const LOCAL_PORT_FIRST: u32 = 1 << 30;

const LISTENER_TOKEN: u32 = 0;
const KICK_TOKEN: u32 = u32::MAX;
const TIMER_TOKEN: u32 = u32::MAX - 1;
const LAST_CONN_TOKEN: u32 = u32::MAX - 2;

/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// A host client that has not finished its `CONNECT <port>\n` line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// Host resources and identity the handler is built from.
pub struct HostSide {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The VM's listening socket (shared across device resets and guest reboots).
    pub listener: Arc<UnixListener>,
    /// Base path: guest connections to host port P go to `<path>_<P>`.
    pub path: PathBuf,
}

/// The worker's state.
pub struct VsockHandler {
    mem: GuestMemoryMmap,
    queues: Vec<Arc<Mutex<Queue>>>,
    interrupt: Arc<dyn VirtioInterrupt>,
    needs_reset: Arc<AtomicBool>,
    metrics: Arc<VsockMetrics>,
    host: HostSide,
    kick: EventFd,
    timer: Option<TimerFd>,
    timer_armed: bool,
    /// A descriptor held in reserve so a client can be refused when the process has none
    /// left.
    spare_fd: Option<std::fs::File>,
    reset_requested: Arc<AtomicBool>,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u32, ConnKey>,
    pending_host: HashMap<u32, PendingHost>,
    host_ports: HashSet<u32>,
    rxq: VecDeque<ConnKey>,
    rst_q: VecDeque<Header>,
    dirty: BTreeSet<u32>,
    next_token: u32,
    next_local_port: u32,
    scratch: Vec<u8>,
    tx_scratch: Vec<u8>,
    event_pending: bool,
    used: [bool; 3],
    broken: bool,
}

impl VsockHandler {
    /// A handler for freshly activated queues (rx, tx, event). `reset_requested` set means
    /// a transport reset event is owed to the guest (after a restore).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemoryMmap,
        queues: Vec<Arc<Mutex<Queue>>>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: Arc<AtomicBool>,
        metrics: Arc<VsockMetrics>,
        host: HostSide,
        kick: EventFd,
        reset_requested: Arc<AtomicBool>,
    ) -> Self {
        let event_pending = reset_requested.swap(false, Ordering::AcqRel);
        Self {
            mem,
            queues,
            interrupt,
            needs_reset,
            metrics,
            host,
            kick,
            timer: None,
            timer_armed: false,
            spare_fd: std::fs::File::open("/dev/null").ok(),
            reset_requested,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending_host: HashMap::new(),
            host_ports: HashSet::new(),
            rxq: VecDeque::new(),
            rst_q: VecDeque::new(),
            dirty: BTreeSet::new(),
            next_token: 1,
            next_local_port: LOCAL_PORT_FIRST,
            scratch: vec![0; MAX_PKT_PAYLOAD as usize],
            tx_scratch: vec![0; MAX_PKT_PAYLOAD as usize],
            event_pending,
            used: [false; 3],
            broken: false,
        }
    }

    /// What each open connection looks like (for snapshots and diagnostics).
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let mut v: Vec<ConnectionInfo> = self.conns.values().map(|c| c.info).collect();
        v.sort_by_key(|i| i.key);
        v
    }

    fn update_gauge(&self) {
        VsockMetrics::set(&self.metrics.active_connections, self.conns.len() as u64);
    }

    fn mark_broken(&mut self, why: &str) {
        tracing::warn!("virtio-vsock: queue broken by the driver: {why}; device needs reset");
        self.broken = true;
        self.drop_all();
        VsockMetrics::add(&self.metrics.broken_queues, 1);
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.trigger(InterruptKind::Config);
    }

    /// Close every host socket and forget every connection.
    fn drop_all(&mut self) {
        self.conns.clear();
        self.tokens.clear();
        self.pending_host.clear();
        self.host_ports.clear();
        self.rxq.clear();
        self.rst_q.clear();
        self.dirty.clear();
        self.update_gauge();
    }

    fn alloc_token(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS * 2 {
            let t = self.next_token;
            self.next_token = if t >= LAST_CONN_TOKEN { 1 } else { t + 1 };
            if !self.tokens.contains_key(&t) && !self.pending_host.contains_key(&t) {
                return Some(t);
            }
        }
        None
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS * 2 {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(LOCAL_PORT_FIRST);
            if !self.host_ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.pending_host.len() >= MAX_CONNECTIONS
    }

    /// Put a connection on the RX list if it owes the guest a packet.
    fn enqueue(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rxq && c.has_pending_rx() {
                c.in_rxq = true;
                self.rxq.push_back(key);
            }
        }
    }

    /// After a connection changed: re-sync its epoll interest, queue it for RX, or drop it.
    fn touched(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        if c.is_gone() {
            self.reap(key);
            return;
        }
        if c.desired_events() != c.registered {
            self.dirty.insert(c.token);
        }
        self.enqueue(key);
    }

    fn reap(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            if c.info.host_initiated {
                self.host_ports.remove(&key.local_port);
            }
        }
        self.update_gauge();
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.rst_q.len() >= MAX_RST_QUEUE {
            VsockMetrics::add(&self.metrics.rst_dropped, 1);
            return;
        }
        self.rst_q.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.host.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        });
    }
}

impl QueueHandler for VsockHandler {
    fn process_queue(&mut self, index: usize) {
        if self.broken {
            return;
        }
        if index == TXQ {
            self.process_tx();
        }
        self.process_event_queue();
        self.process_rx();
        self.notify();
        self.kick_if_dirty();
    }

    fn register(&mut self, ctl: &EventControl<'_>) -> std::io::Result<()> {
        ctl.add(self.host.listener.as_raw_fd(), EventSet::IN, LISTENER_TOKEN)?;
        ctl.add(self.kick.as_raw_fd(), EventSet::IN, KICK_TOKEN)?;
        let timer = TimerFd::new().map_err(std::io::Error::from)?;
        ctl.add(timer.as_raw_fd(), EventSet::IN, TIMER_TOKEN)?;
        self.timer = Some(timer);
        Ok(())
    }

    fn process_event(&mut self, token: u32, events: EventSet, ctl: &EventControl<'_>) {
        match token {
            LISTENER_TOKEN => self.accept_all(ctl),
            KICK_TOKEN => {
                let _ = self.kick.read();
                if self.reset_requested.swap(false, Ordering::AcqRel) && !self.broken {
                    self.transport_reset();
                }
            }
            TIMER_TOKEN => {
                if let Some(t) = self.timer.as_mut() {
                    let _ = t.wait();
                }
                self.timer_armed = false;
                if !self.broken {
                    self.expire();
                    if self.anything_waits() {
                        self.arm_timer();
                    }
                }
            }
            t if self.pending_host.contains_key(&t) => self.on_pending_host(t),
            t => self.on_conn_event(t, events),
        }
        self.process_rx();
        self.sync_interest(ctl);
        self.notify();
    }
}

/// The handler behind a lock, so the device can read connection state while it runs.
pub struct SharedHandler(pub Arc<Mutex<VsockHandler>>);

impl QueueHandler for SharedHandler {
    fn process_queue(&mut self, index: usize) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process_queue(index);
    }

    fn register(&mut self, ctl: &EventControl<'_>) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(ctl)
    }

    fn process_event(&mut self, token: u32, events: EventSet, ctl: &EventControl<'_>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process_event(token, events, ctl);
    }
}
