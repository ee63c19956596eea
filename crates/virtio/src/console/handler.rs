//! The virtio-console worker: moves host input into the guest's receive buffers (only when
//! the guest has posted some: otherwise the host descriptor is not read, which pushes back on
//! the host writer) and guest output to the host (never blocking: see [`super::backend`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_device::GuestMemoryMmap;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{BackendState, ConsoleBackend, FlushOutcome, HostIo, ReadOutcome};
use super::metrics::ConsoleMetrics;
use crate::block::request::parse_chain;
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::rng::fill::write_segments;
use crate::worker::{EventControl, EventSet, QueueHandler};

/// receiveq of port 0.
pub const RX_QUEUE: usize = 0;
/// transmitq of port 0.
pub const TX_QUEUE: usize = 1;
/// Most bytes taken from one transmit chain (larger chains are truncated and counted as
/// dropped).
const MAX_TX_CHAIN_BYTES: u64 = 64 * 1024;

const TOKEN_LISTENER: u32 = 0;
const TOKEN_STREAM: u32 = 1;
/// Our own eventfd: a queue notification (which the worker reports without an
/// [`EventControl`]) changed what we want to watch; re-sync from `process_event`.
const TOKEN_REARM: u32 = 2;

/// State the worker thread owns.
pub struct ConsoleHandler {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// receiveq.
    pub rx: Arc<Mutex<Queue>>,
    /// transmitq.
    pub tx: Arc<Mutex<Queue>>,
    /// The host endpoint.
    pub backend: Arc<ConsoleBackend>,
    /// Counters.
    pub metrics: Arc<ConsoleMetrics>,
    /// Interrupt sink.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Set when the driver broke a queue.
    pub needs_reset: Arc<AtomicBool>,
    /// The driver broke a queue; nothing more is processed until reset.
    pub broken: bool,
    /// The guest had receive buffers available when last looked at.
    rx_ready: bool,
    /// The stream descriptor registered with the worker, with its events.
    stream_reg: Option<(RawFd, EventSet)>,
    /// The listening socket registered with the worker.
    listener_reg: Option<RawFd>,
    /// Wakes the worker to re-sync the watched descriptors (see [`TOKEN_REARM`]).
    rearm: EventFd,
}

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConsoleHandler {
    /// A handler for the two queues of port 0.
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Arc<Mutex<Queue>>,
        tx: Arc<Mutex<Queue>>,
        backend: Arc<ConsoleBackend>,
        metrics: Arc<ConsoleMetrics>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            mem,
            rx,
            tx,
            backend,
            metrics,
            interrupt,
            needs_reset,
            broken: false,
            rx_ready: true,
            stream_reg: None,
            listener_reg: None,
            rearm: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn mark_broken(&mut self, why: &str) {
        tracing::warn!("virtio-console: queue broken by the driver: {why}; device needs reset");
        self.broken = true;
        ConsoleMetrics::add(&self.metrics.broken_queues, 1);
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.trigger(InterruptKind::Config);
    }

    fn notify(&self, queue: &mut Queue, index: u16) -> Result<(), &'static str> {
        if queue
            .needs_notification(&self.mem)
            .map_err(|_| "cannot read used_event")?
        {
            ConsoleMetrics::add(&self.metrics.interrupts, 1);
            self.interrupt.trigger(InterruptKind::Queue(index));
        }
        Ok(())
    }

    /// Number of chains the driver made available and we have not taken yet.
    fn pending_chains(&self, queue: &Queue) -> Result<u16, &'static str> {
        let avail = queue
            .avail_idx(&self.mem, Ordering::Acquire)
            .map_err(|_| "cannot read avail index")?;
        let pending = (avail - std::num::Wrapping(queue.next_avail())).0;
        if pending > queue.size() {
            return Err("avail index runs ahead of the queue size");
        }
        Ok(pending)
    }

    /// Deliver host input into receive buffers while both exist.
    fn pump_rx(&mut self, st: &mut BackendState) -> Result<(), &'static str> {
        let rx = self.rx.clone();
        let mut q = lock(&rx);
        if !q.ready() {
            self.rx_ready = false;
            return Ok(());
        }
        let mut used_any = false;
        loop {
            let pending = self.pending_chains(&q)?;
            self.rx_ready = pending > 0;
            if pending == 0 {
                break;
            }
            if st.rx_pending.is_empty() {
                match st.read_input() {
                    ReadOutcome::Data(_) => {}
                    ReadOutcome::WouldBlock | ReadOutcome::NoInput => break,
                    ReadOutcome::Closed => {
                        self.drop_client(st);
                        break;
                    }
                }
            }
            let chain = q
                .pop_descriptor_chain(&self.mem)
                .ok_or("cannot read avail ring entry")?;
            let head = chain.head_index();
            let parsed = parse_chain(chain).map_err(|_| "malformed descriptor chain")?;
            let capacity = parsed
                .writable
                .iter()
                .fold(0u64, |a, s| a.saturating_add(s.len));
            let take = st
                .rx_pending
                .len()
                .min(usize::try_from(capacity).unwrap_or(usize::MAX));
            let data: Vec<u8> = st.rx_pending.iter().take(take).copied().collect();
            let (written, ok) = write_segments(&self.mem, &parsed.writable, &data);
            if !ok || take == 0 || !parsed.readable.is_empty() {
                ConsoleMetrics::add(&self.metrics.errors, 1);
            }
            st.rx_pending.drain(..written);
            ConsoleMetrics::add(&self.metrics.rx_bytes, written as u64);
            // written <= capacity, which the chain iterator bounds to u32.
            q.add_used(&self.mem, head, written as u32)
                .map_err(|_| "cannot add used entry")?;
            used_any = true;
        }
        if used_any {
            self.notify(&mut q, RX_QUEUE as u16)?;
        }
        Ok(())
    }

    /// Take every transmit chain's bytes into the output buffer, then flush.
    fn pump_tx(&mut self, st: &mut BackendState) -> Result<(), &'static str> {
        let tx = self.tx.clone();
        let mut q = lock(&tx);
        if !q.ready() {
            return Ok(());
        }
        let mut used_any = false;
        let mut buf = Vec::new();
        while self.pending_chains(&q)? > 0 {
            let chain = q
                .pop_descriptor_chain(&self.mem)
                .ok_or("cannot read avail ring entry")?;
            let head = chain.head_index();
            let parsed = parse_chain(chain).map_err(|_| "malformed descriptor chain")?;
            let mut budget = MAX_TX_CHAIN_BYTES;
            let mut dropped = 0u64;
            let mut bad = !parsed.writable.is_empty();
            for s in &parsed.readable {
                let take = s.len.min(budget);
                dropped += s.len - take;
                budget -= take;
                // take <= 64 KiB.
                buf.resize(take as usize, 0);
                if self.mem.read_slice(&mut buf, s.addr).is_err() {
                    bad = true;
                    break;
                }
                let lost = st.queue_output(&buf) as u64;
                dropped += lost;
                ConsoleMetrics::add(&self.metrics.tx_bytes, take - lost);
            }
            if bad {
                ConsoleMetrics::add(&self.metrics.errors, 1);
            }
            ConsoleMetrics::add(&self.metrics.tx_dropped_bytes, dropped);
            q.add_used(&self.mem, head, 0)
                .map_err(|_| "cannot add used entry")?;
            used_any = true;
        }
        if used_any {
            self.notify(&mut q, TX_QUEUE as u16)?;
        }
        drop(q);
        if st.flush() == FlushOutcome::Closed {
            self.drop_client(st);
        }
        Ok(())
    }

    fn drop_client(&mut self, st: &mut BackendState) {
        if let HostIo::Socket { conn: Some(_), .. } = &st.io {
            tracing::info!("virtio-console: host client disconnected");
            // Closing the descriptor removes it from the epoll set; forget our record so the
            // next client (which may get the same number) is added afresh.
            self.stream_reg = None;
            st.disconnect();
        }
    }

    /// What should be watched now: the listener, and the stream with its events.
    fn desired(&self, st: &BackendState) -> (Option<RawFd>, Option<(RawFd, EventSet)>) {
        let stream = st.stream_fd().map(|fd| {
            let mut ev = EventSet::empty();
            if self.rx_ready && st.rx_pending.is_empty() && !self.broken {
                ev |= EventSet::IN;
            }
            if !st.out.is_empty() {
                ev |= EventSet::OUT;
            }
            (fd, ev)
        });
        (st.listener_fd(), stream)
    }

    /// Make the worker's epoll set match what we want to hear about.
    fn sync_interest(&mut self, st: &BackendState, ctl: &EventControl<'_>) {
        let (want_listener, want_stream) = self.desired(st);
        if want_listener != self.listener_reg {
            if let Some(fd) = self.listener_reg.take() {
                let _ = ctl.remove(fd);
            }
            if let Some(fd) = want_listener {
                match ctl.add(fd, EventSet::IN, TOKEN_LISTENER) {
                    Ok(()) => self.listener_reg = Some(fd),
                    Err(e) => tracing::error!("virtio-console: cannot watch the socket: {e}"),
                }
            }
        }
        if want_stream == self.stream_reg {
            return;
        }
        let result = match (self.stream_reg, want_stream) {
            (Some((old, _)), Some((fd, ev))) if old == fd => ctl
                .modify(fd, ev, TOKEN_STREAM)
                .or_else(|_| ctl.add(fd, ev, TOKEN_STREAM)),
            (old, new) => {
                if let Some((fd, _)) = old {
                    let _ = ctl.remove(fd);
                }
                match new {
                    Some((fd, ev)) => ctl.add(fd, ev, TOKEN_STREAM),
                    None => Ok(()),
                }
            }
        };
        match result {
            Ok(()) => self.stream_reg = want_stream,
            Err(e) => {
                tracing::error!("virtio-console: cannot watch the host stream: {e}");
                self.stream_reg = None;
            }
        }
    }

    fn run<F>(&mut self, ctl: Option<&EventControl<'_>>, f: F)
    where
        F: FnOnce(&mut Self, &mut BackendState) -> Result<(), &'static str>,
    {
        let backend = self.backend.clone();
        let mut st = backend.lock();
        if !self.broken {
            if let Err(why) = f(self, &mut st) {
                self.mark_broken(why);
            }
        }
        match ctl {
            Some(ctl) => self.sync_interest(&st, ctl),
            None => {
                if self.desired(&st) != (self.listener_reg, self.stream_reg) {
                    if let Err(e) = self.rearm.write(1) {
                        tracing::error!("virtio-console: cannot wake the worker: {e}");
                    }
                }
            }
        }
    }

    /// Queue `index` was notified; `ctl` is None only in unit tests without a worker.
    pub fn handle_queue(&mut self, index: usize, ctl: Option<&EventControl<'_>>) {
        match index {
            RX_QUEUE => self.run(ctl, |h, st| h.pump_rx(st)),
            TX_QUEUE => self.run(ctl, |h, st| h.pump_tx(st)),
            _ => {}
        }
    }

    /// A host descriptor is ready.
    pub fn handle_event(&mut self, token: u32, events: EventSet, ctl: Option<&EventControl<'_>>) {
        self.run(ctl, |h, st| {
            if token == TOKEN_LISTENER {
                match st.accept() {
                    Ok(true) => {
                        tracing::info!("virtio-console: host client connected");
                        ConsoleMetrics::add(&h.metrics.connections, 1);
                        if st.flush() == FlushOutcome::Closed {
                            h.drop_client(st);
                            return Ok(());
                        }
                        h.rx_ready = true;
                        return h.pump_rx(st);
                    }
                    Ok(false) => return Ok(()),
                    Err(e) => {
                        tracing::warn!("virtio-console: accept failed: {e}");
                        return Ok(());
                    }
                }
            }
            if events.contains(EventSet::OUT) && st.flush() == FlushOutcome::Closed {
                h.drop_client(st);
                return Ok(());
            }
            if events.contains(EventSet::IN) {
                h.pump_rx(st)?;
            }
            if events.intersects(EventSet::HANG_UP | EventSet::ERROR)
                && !events.contains(EventSet::IN)
            {
                h.drop_client(st);
            }
            Ok(())
        });
    }
}

impl QueueHandler for ConsoleHandler {
    fn process_queue(&mut self, index: usize) {
        // No control handle here: a change of interest goes through the rearm eventfd.
        self.handle_queue(index, None);
    }

    fn register(&mut self, ctl: &EventControl<'_>) -> std::io::Result<()> {
        self.stream_reg = None;
        self.listener_reg = None;
        ctl.add(self.rearm.as_raw_fd(), EventSet::IN, TOKEN_REARM)?;
        let backend = self.backend.clone();
        let st = backend.lock();
        self.sync_interest(&st, ctl);
        Ok(())
    }

    fn process_event(&mut self, token: u32, events: EventSet, ctl: &EventControl<'_>) {
        if token == TOKEN_REARM {
            let _ = self.rearm.read();
            let backend = self.backend.clone();
            let st = backend.lock();
            self.sync_interest(&st, ctl);
            return;
        }
        self.handle_event(token, events, Some(ctl));
    }
}
