//! The virtio-blk worker's queue processing: pop chains, hand them to the I/O pool (or run
//! them inline when the device has no pool), and wake up again when a throttled queue may
//! continue. Notifications are disabled while the worker drains (EVENT_IDX's avail_event
//! when negotiated) and completions interrupt only when the driver asked to be told.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::metrics::BlockMetrics;
use super::pool::{IoPool, Job, Shared};
use super::request::parse_chain;
use crate::device::InterruptKind;
use crate::worker::{EventControl, EventSet, QueueHandler};

/// Token of the pool's wake-up eventfd.
const WAKE_TOKEN: u32 = 0;

/// State the worker thread owns.
pub struct BlockHandler {
    /// State shared with the I/O threads and the device.
    pub shared: Arc<Shared>,
    /// The I/O threads; `None` runs every request on the worker thread.
    pool: Option<IoPool>,
}

/// Why draining stopped early.
enum Stop {
    /// The driver broke the queue.
    Broken(&'static str),
}

impl BlockHandler {
    /// A handler with `io_threads` I/O threads (0: execute on the worker thread).
    pub fn new(shared: Arc<Shared>, io_threads: usize) -> std::io::Result<Self> {
        let pool = if io_threads == 0 {
            None
        } else {
            Some(IoPool::spawn(io_threads, shared.clone())?)
        };
        Ok(Self { shared, pool })
    }

    /// Pop and dispatch everything available; returns whether used entries were added
    /// inline (pool completions notify on their own).
    fn drain(&mut self, queue: &mut Queue) -> Result<bool, Stop> {
        let shared = &*self.shared;
        let mem = &shared.mem;
        let mut used_any = false;
        loop {
            queue
                .disable_notification(mem)
                .map_err(|_| Stop::Broken("cannot write used ring flags"))?;
            loop {
                // A driver can never have more than a queue's worth of requests outstanding;
                // one that republishes heads still in flight is held back here.
                if self.pool.is_some() && shared.throttle_if_full(usize::from(queue.size())) {
                    return Ok(used_any);
                }
                let avail = queue
                    .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(|_| Stop::Broken("cannot read avail index"))?;
                let pending = avail - std::num::Wrapping(queue.next_avail());
                if pending.0 == 0 {
                    break;
                }
                if pending.0 > queue.size() {
                    return Err(Stop::Broken("avail index runs ahead of the queue size"));
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    return Err(Stop::Broken("cannot read avail ring entry"));
                };
                let head = chain.head_index();
                let parsed =
                    parse_chain(chain).map_err(|_| Stop::Broken("malformed descriptor chain"))?;
                match &self.pool {
                    Some(pool) => {
                        shared.begin();
                        pool.submit(Job {
                            head,
                            chain: parsed,
                        });
                    }
                    None => {
                        let used_len = shared.executor().run(&parsed);
                        queue
                            .add_used(mem, head, used_len)
                            .map_err(|_| Stop::Broken("cannot add used entry"))?;
                        used_any = true;
                    }
                }
            }
            // Re-enable notifications; if the driver added more meanwhile, go again.
            if !queue
                .enable_notification(mem)
                .map_err(|_| Stop::Broken("cannot write used ring flags"))?
            {
                break;
            }
        }
        Ok(used_any)
    }
}

impl QueueHandler for BlockHandler {
    fn process_queue(&mut self, index: usize) {
        if index != 0 || self.shared.is_broken() {
            return;
        }
        let queue = self.shared.queue.clone();
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return;
        }
        match self.drain(&mut q) {
            Ok(true) => match q.needs_notification(&self.shared.mem) {
                Ok(true) => {
                    drop(q);
                    BlockMetrics::add(&self.shared.metrics.interrupts, 1);
                    self.shared.interrupt.trigger(InterruptKind::Queue(0));
                }
                Ok(false) => {}
                Err(_) => {
                    drop(q);
                    self.shared.mark_broken("cannot read used_event");
                }
            },
            Ok(false) => {}
            Err(Stop::Broken(why)) => {
                drop(q);
                self.shared.mark_broken(why);
            }
        }
    }

    fn register(&mut self, ctl: &EventControl<'_>) -> std::io::Result<()> {
        ctl.add(self.shared.wake.as_raw_fd(), EventSet::IN, WAKE_TOKEN)
    }

    fn process_event(&mut self, token: u32, _events: EventSet, _ctl: &EventControl<'_>) {
        if token == WAKE_TOKEN {
            let _ = self.shared.wake.read();
            self.process_queue(0);
        }
    }
}
