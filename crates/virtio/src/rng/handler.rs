//! The virtio-rng worker's queue processing: pop requests, fill them with host entropy,
//! publish used entries and interrupt the guest.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_device::GuestMemoryMmap;

use super::fill::{getrandom_fill, write_segments};
use super::metrics::RngMetrics;
use super::MAX_REQUEST_BYTES;
use crate::block::request::{parse_chain, Segment};
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::worker::{EventControl, EventSet, QueueHandler};

/// Decides whether a request of `bytes` may be served now (a rate limiter). A refused
/// request stays in the queue until the budget's timer fires.
pub trait Budget: Send {
    /// Take `bytes` from the budget; false if the request must wait.
    fn try_consume(&mut self, bytes: u64) -> bool;
    /// A descriptor that becomes readable when the budget may have refilled.
    fn timer_fd(&self) -> Option<RawFd> {
        None
    }
    /// The timer fired: acknowledge it.
    fn on_timer(&mut self) {}
}

/// A shared rate limiter as a budget: each request costs its bytes and one operation.
impl Budget for rate_limiter::SharedRateLimiter {
    fn try_consume(&mut self, bytes: u64) -> bool {
        self.consume_request(bytes, 1)
    }

    fn timer_fd(&self) -> Option<RawFd> {
        Some(rate_limiter::SharedRateLimiter::timer_fd(self))
    }

    fn on_timer(&mut self) {
        if let Err(e) = self.timer_event() {
            tracing::warn!("virtio-rng: rate limiter timer: {e}");
        }
    }
}

/// Worker token of the budget's timer.
const TOKEN_TIMER: u32 = 0;

/// What one pass over the queue ended with.
enum Drained {
    /// Everything available was served; whether any used entry was added.
    Done(bool),
    /// The budget ran out; whether any used entry was added before that.
    Throttled(bool),
}

/// State the worker thread owns.
pub struct RngHandler {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The request queue.
    pub queue: Arc<Mutex<Queue>>,
    /// Counters.
    pub metrics: Arc<RngMetrics>,
    /// Interrupt sink.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Set when the driver broke the queue.
    pub needs_reset: Arc<AtomicBool>,
    /// The driver broke the queue; nothing more is processed until reset.
    pub broken: bool,
    /// Optional rate limit.
    pub budget: Option<Box<dyn Budget>>,
    /// Scratch buffer for one request.
    pub buf: Vec<u8>,
}

impl RngHandler {
    /// A handler for `queue` with no rate limit.
    pub fn new(
        mem: GuestMemoryMmap,
        queue: Arc<Mutex<Queue>>,
        metrics: Arc<RngMetrics>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: Arc<AtomicBool>,
    ) -> Self {
        Self {
            mem,
            queue,
            metrics,
            interrupt,
            needs_reset,
            broken: false,
            budget: None,
            buf: Vec::new(),
        }
    }

    fn mark_broken(&mut self, why: &str) {
        tracing::warn!("virtio-rng: queue broken by the driver: {why}; device needs reset");
        self.broken = true;
        RngMetrics::add(&self.metrics.broken_queues, 1);
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.trigger(InterruptKind::Config);
    }

    /// Serve one popped chain; returns the used length.
    fn serve(&mut self, writable: &[Segment], has_readable: bool) -> u32 {
        RngMetrics::add(&self.metrics.requests, 1);
        if has_readable {
            // virtio 1.2 §5.4.6: requestq buffers are device-writable only.
            RngMetrics::add(&self.metrics.errors, 1);
            return 0;
        }
        let total = writable.iter().fold(0u64, |a, s| a.saturating_add(s.len));
        let want = total.min(MAX_REQUEST_BYTES as u64) as usize;
        self.buf.resize(want, 0);
        if let Err(e) = getrandom_fill(&mut self.buf) {
            tracing::error!("virtio-rng: getrandom failed: {e}");
            RngMetrics::add(&self.metrics.errors, 1);
            return 0;
        }
        let (written, ok) = write_segments(&self.mem, writable, &self.buf);
        if !ok {
            RngMetrics::add(&self.metrics.errors, 1);
        }
        RngMetrics::add(&self.metrics.bytes, written as u64);
        // `written` <= MAX_REQUEST_BYTES, so it fits.
        written as u32
    }

    fn drain(&mut self, queue: &mut Queue) -> Result<Drained, &'static str> {
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
                let has_readable = !parsed.readable.is_empty();
                let total = parsed
                    .writable
                    .iter()
                    .fold(0u64, |a, s| a.saturating_add(s.len))
                    .min(MAX_REQUEST_BYTES as u64);
                if let Some(b) = self.budget.as_mut() {
                    if !has_readable && total > 0 && !b.try_consume(total) {
                        // Put the chain back; the limiter's timer wakes us.
                        queue.go_to_previous_position();
                        RngMetrics::add(&self.metrics.throttled, 1);
                        queue
                            .enable_notification(&self.mem)
                            .map_err(|_| "cannot write used ring flags")?;
                        return Ok(Drained::Throttled(used_any));
                    }
                }
                let used_len = self.serve(&parsed.writable, has_readable);
                queue
                    .add_used(&self.mem, head, used_len)
                    .map_err(|_| "cannot add used entry")?;
                used_any = true;
            }
            if !queue
                .enable_notification(&self.mem)
                .map_err(|_| "cannot write used ring flags")?
            {
                break;
            }
        }
        Ok(Drained::Done(used_any))
    }

    /// Serve what is available (also called when the rate limiter's timer fires).
    pub fn process(&mut self) {
        if self.broken {
            return;
        }
        let queue = self.queue.clone();
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return;
        }
        let used_any = match self.drain(&mut q) {
            Ok(Drained::Done(u) | Drained::Throttled(u)) => u,
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
                RngMetrics::add(&self.metrics.interrupts, 1);
                self.interrupt.trigger(InterruptKind::Queue(0));
            }
            Ok(false) => {}
            Err(_) => {
                drop(q);
                self.mark_broken("cannot read used_event");
            }
        }
    }
}

impl QueueHandler for RngHandler {
    fn process_queue(&mut self, index: usize) {
        if index == 0 {
            self.process();
        }
    }

    fn register(&mut self, ctl: &EventControl<'_>) -> std::io::Result<()> {
        if let Some(fd) = self.budget.as_ref().and_then(|b| b.timer_fd()) {
            ctl.add(fd, EventSet::IN, TOKEN_TIMER)?;
        }
        Ok(())
    }

    fn process_event(&mut self, token: u32, _events: EventSet, _ctl: &EventControl<'_>) {
        if token == TOKEN_TIMER {
            if let Some(b) = self.budget.as_mut() {
                b.on_timer();
            }
            self.process();
        }
    }
}
