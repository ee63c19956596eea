//! The virtio-balloon worker's queue processing: inflate (release pages to the host),
//! deflate (accounting), statistics (keep the driver's buffer, give it back to ask for fresh
//! numbers) and free page reporting (release the reported ranges).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::metrics::BalloonMetrics;
use super::release::{coalesce, release, ReleaseError};
use super::{
    BalloonShared, MAX_PFN_BYTES, MAX_STAT_ENTRIES, PAGE_SHIFT, PAGE_SIZE, STAT_ENTRY_BYTES,
};
use crate::block::request::{parse_chain, ParsedChain, Segment};
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::worker::{EventControl, EventSet, QueueHandler};

/// What a queue index is used for (depends on the negotiated features).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// inflateq: page numbers the guest gives to the host.
    Inflate,
    /// deflateq: page numbers the guest takes back.
    Deflate,
    /// statsq: the guest's memory statistics.
    Stats,
    /// reporting_vq: free ranges the guest lends to the host.
    Reporting,
}

/// Worker token of the periodic statistics timer.
const TOKEN_TIMER: u32 = 0;
/// Worker token of the host's "fresh statistics, please" eventfd.
const TOKEN_REQUEST: u32 = 1;

/// State the worker thread owns.
pub struct BalloonHandler {
    mem: GuestMemoryMmap,
    queues: Vec<Arc<Mutex<Queue>>>,
    roles: Vec<QueueRole>,
    shared: Arc<BalloonShared>,
    metrics: Arc<BalloonMetrics>,
    interrupt: Arc<dyn VirtioInterrupt>,
    needs_reset: Arc<AtomicBool>,
    /// The driver broke a queue; nothing more is processed until reset.
    pub broken: bool,
    stats_request: Option<EventFd>,
    stats_period: Option<Duration>,
    timer: Option<TimerFd>,
    buf: Vec<u8>,
}

impl BalloonHandler {
    /// A handler for `queues`, queue `i` used as `roles[i]`.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: Vec<Arc<Mutex<Queue>>>,
        roles: Vec<QueueRole>,
        shared: Arc<BalloonShared>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: Arc<AtomicBool>,
    ) -> Self {
        Self {
            mem,
            queues,
            roles,
            metrics: shared.metrics(),
            shared,
            interrupt,
            needs_reset,
            broken: false,
            stats_request: None,
            stats_period: None,
            timer: None,
            buf: Vec::new(),
        }
    }

    /// Watch `request` (host asks for statistics) and ask every `period` too.
    pub fn with_stats_events(mut self, request: EventFd, period: Option<Duration>) -> Self {
        self.stats_request = Some(request);
        self.stats_period = period.filter(|p| !p.is_zero());
        self
    }

    /// Whether the device currently holds the driver's statistics buffer.
    pub fn holds_stats_buffer(&self) -> bool {
        self.shared.stats_head().is_some()
    }

    fn mark_broken(&mut self, why: &str) {
        tracing::warn!("virtio-balloon: queue broken by the driver: {why}; device needs reset");
        self.broken = true;
        BalloonMetrics::add(&self.metrics.broken_queues, 1);
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.trigger(InterruptKind::Config);
    }

    /// Read the page numbers of a chain's readable part (at most [`MAX_PFN_BYTES`]).
    fn read_pfns(&mut self, segs: &[Segment]) -> Vec<u32> {
        let mut pfns = Vec::new();
        let mut budget = MAX_PFN_BYTES;
        for s in segs {
            let n = s.len.min(budget) & !3;
            if n == 0 {
                break;
            }
            budget -= n;
            self.buf.resize(n as usize, 0);
            if self.mem.read_slice(&mut self.buf, s.addr).is_err() {
                BalloonMetrics::add(&self.metrics.invalid_ranges, 1);
                continue;
            }
            pfns.extend(
                self.buf
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        pfns
    }

    /// Release `[gpa, gpa + len)`; false if the range is not guest RAM (nothing released).
    fn give_back(&self, gpa: u64, len: u64) -> bool {
        match release(&self.mem, gpa, len) {
            Ok(bytes) => BalloonMetrics::add(&self.metrics.released_bytes, bytes),
            Err(ReleaseError::NotRam { .. }) => return false,
            Err(e) => {
                tracing::warn!("virtio-balloon: {e}");
                BalloonMetrics::add(&self.metrics.release_errors, 1);
            }
        }
        true
    }

    fn inflate(&mut self, parsed: &ParsedChain) {
        let pfns = self.read_pfns(&parsed.readable);
        BalloonMetrics::add(&self.metrics.inflated_pages, pfns.len() as u64);
        for (first, pages) in coalesce(&pfns) {
            if self.give_back(first << PAGE_SHIFT, pages << PAGE_SHIFT) {
                continue;
            }
            // The run leaves guest RAM somewhere: release the pages that are RAM one by one.
            for pfn in first..first + pages {
                if !self.give_back(pfn << PAGE_SHIFT, PAGE_SIZE) {
                    BalloonMetrics::add(&self.metrics.invalid_ranges, 1);
                }
            }
        }
    }

    fn deflate(&mut self, parsed: &ParsedChain) {
        let pfns = self.read_pfns(&parsed.readable);
        let valid = pfns
            .iter()
            .filter(|&&p| {
                self.mem
                    .check_range(GuestAddress(u64::from(p) << PAGE_SHIFT), PAGE_SIZE as usize)
            })
            .count() as u64;
        BalloonMetrics::add(&self.metrics.deflated_pages, valid);
        BalloonMetrics::add(&self.metrics.invalid_ranges, pfns.len() as u64 - valid);
    }

    fn report(&mut self, parsed: &ParsedChain) {
        // Linux posts the ranges as device-writable buffers; accept either direction.
        for s in parsed.readable.iter().chain(&parsed.writable) {
            BalloonMetrics::add(&self.metrics.reported_bytes, s.len);
            if !self.give_back(s.addr.0, s.len) {
                BalloonMetrics::add(&self.metrics.invalid_ranges, 1);
            }
        }
    }

    fn read_stats(&mut self, parsed: &ParsedChain) {
        let mut bytes = Vec::new();
        let cap = (MAX_STAT_ENTRIES * STAT_ENTRY_BYTES) as u64;
        for s in &parsed.readable {
            let n = s.len.min(cap - bytes.len() as u64) as usize;
            if n == 0 {
                break;
            }
            let start = bytes.len();
            bytes.resize(start + n, 0);
            if self.mem.read_slice(&mut bytes[start..], s.addr).is_err() {
                BalloonMetrics::add(&self.metrics.stats_errors, 1);
                return;
            }
        }
        if bytes.len() < STAT_ENTRY_BYTES {
            BalloonMetrics::add(&self.metrics.stats_errors, 1);
            return;
        }
        let entries = bytes
            .chunks_exact(STAT_ENTRY_BYTES)
            .map(|c| {
                let tag = u16::from_le_bytes([c[0], c[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&c[2..10]);
                (tag, u64::from_le_bytes(v))
            })
            .collect();
        self.shared.set_stats(entries);
        BalloonMetrics::add(&self.metrics.stats_updates, 1);
    }

    /// Serve queue `index`; returns whether a used entry was added.
    fn drain(&mut self, index: usize, queue: &mut Queue) -> Result<bool, &'static str> {
        let role = self.roles[index];
        let mut used_any = false;
        loop {
            queue
                .disable_notification(&self.mem)
                .map_err(|_| "cannot write used ring flags")?;
            loop {
                let avail = queue
                    .avail_idx(&self.mem, Ordering::Acquire)
                    .map_err(|_| "cannot read avail index")?;
                let pending = avail - std::num::Wrapping(queue.next_avail());
                if pending.0 == 0 {
                    break;
                }
                if pending.0 > queue.size() {
                    return Err("avail index runs ahead of the queue size");
                }
                let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                    return Err("cannot read avail ring entry");
                };
                let head = chain.head_index();
                let parsed = parse_chain(chain).map_err(|_| "malformed descriptor chain")?;
                let complete = match role {
                    QueueRole::Inflate => {
                        self.inflate(&parsed);
                        Some(head)
                    }
                    QueueRole::Deflate => {
                        self.deflate(&parsed);
                        Some(head)
                    }
                    QueueRole::Reporting => {
                        self.report(&parsed);
                        Some(head)
                    }
                    QueueRole::Stats => {
                        self.read_stats(&parsed);
                        // Keep the newest buffer; an older one goes back at once.
                        self.shared.replace_stats_head(Some(head))
                    }
                };
                if let Some(h) = complete {
                    queue
                        .add_used(&self.mem, h, 0)
                        .map_err(|_| "cannot add used entry")?;
                    used_any = true;
                }
            }
            if !queue
                .enable_notification(&self.mem)
                .map_err(|_| "cannot write used ring flags")?
            {
                break;
            }
        }
        Ok(used_any)
    }

    fn notify(&self, index: usize, queue: &mut Queue) -> Result<(), &'static str> {
        if queue
            .needs_notification(&self.mem)
            .map_err(|_| "cannot read used_event")?
        {
            BalloonMetrics::add(&self.metrics.interrupts, 1);
            self.interrupt.trigger(InterruptKind::Queue(index as u16));
        }
        Ok(())
    }

    /// Serve what is available on queue `index`.
    pub fn process(&mut self, index: usize) {
        if self.broken || index >= self.roles.len() {
            return;
        }
        let queue = self.queues[index].clone();
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return;
        }
        let result = match self.drain(index, &mut q) {
            Ok(true) => self.notify(index, &mut q),
            Ok(false) => Ok(()),
            Err(why) => Err(why),
        };
        drop(q);
        if let Err(why) = result {
            self.mark_broken(why);
        }
    }

    /// Give the statistics buffer back so the driver refills it (no-op if the device does
    /// not hold it).
    pub fn request_stats(&mut self) {
        if self.broken {
            return;
        }
        let Some(index) = self.roles.iter().position(|r| *r == QueueRole::Stats) else {
            return;
        };
        let Some(head) = self.shared.replace_stats_head(None) else {
            return;
        };
        let queue = self.queues[index].clone();
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        let result = q
            .add_used(&self.mem, head, 0)
            .map_err(|_| "cannot add used entry")
            .and_then(|()| self.notify(index, &mut q));
        drop(q);
        if let Err(why) = result {
            self.mark_broken(why);
        }
    }
}

impl QueueHandler for BalloonHandler {
    fn process_queue(&mut self, index: usize) {
        self.process(index);
    }

    fn register(&mut self, ctl: &EventControl<'_>) -> std::io::Result<()> {
        if !self.roles.contains(&QueueRole::Stats) {
            return Ok(());
        }
        if let Some(req) = &self.stats_request {
            ctl.add(req.as_raw_fd(), EventSet::IN, TOKEN_REQUEST)?;
        }
        if let Some(period) = self.stats_period {
            let mut timer = TimerFd::new().map_err(std::io::Error::from)?;
            timer
                .reset(period, Some(period))
                .map_err(std::io::Error::from)?;
            ctl.add(timer.as_raw_fd(), EventSet::IN, TOKEN_TIMER)?;
            self.timer = Some(timer);
        }
        Ok(())
    }

    fn process_event(&mut self, token: u32, _events: EventSet, _ctl: &EventControl<'_>) {
        match token {
            TOKEN_TIMER => {
                if let Some(t) = self.timer.as_mut() {
                    let _ = t.wait();
                }
            }
            TOKEN_REQUEST => {
                if let Some(r) = &self.stats_request {
                    let _ = r.read();
                }
            }
            _ => return,
        }
        self.request_stats();
    }
}
