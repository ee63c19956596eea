//! The virtio-blk worker's queue processing: pop chains, execute, publish used entries and
//! interrupt the guest (with EVENT_IDX suppression).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use disk::DiskBackend;
use virtio_queue::{Queue, QueueT};
use vm_device::GuestMemoryMmap;

use super::metrics::BlockMetrics;
use super::request::{parse_chain, Executor, Limits};
use crate::device::{InterruptKind, VirtioInterrupt};
use crate::worker::QueueHandler;

/// State the worker thread owns.
pub struct BlockHandler {
    pub mem: GuestMemoryMmap,
    pub queue: Arc<Mutex<Queue>>,
    pub disk: Arc<dyn DiskBackend>,
    pub serial: Vec<u8>,
    pub acked_features: u64,
    pub limits: Limits,
    pub metrics: Arc<BlockMetrics>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub needs_reset: Arc<AtomicBool>,
    /// The driver broke the queue; nothing more is processed until reset.
    pub broken: bool,
}

impl BlockHandler {
    fn mark_broken(&mut self, why: &str) {
        tracing::warn!("virtio-blk: queue broken by the driver: {why}; device needs reset");
        self.broken = true;
        BlockMetrics::add(&self.metrics.broken_queues, 1);
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.trigger(InterruptKind::Config);
    }

    /// Process everything available; returns whether used entries were added, or Err(why)
    /// if the queue is broken.
    fn drain(&mut self, queue: &mut Queue) -> Result<bool, &'static str> {
        let mem = &self.mem;
        let exec = Executor {
            mem,
            disk: &*self.disk,
            serial: &self.serial,
            acked_features: self.acked_features,
            limits: self.limits,
            metrics: &self.metrics,
        };
        let mut used_any = false;
        loop {
            queue
                .disable_notification(mem)
                .map_err(|_| "cannot write used ring flags")?;
            loop {
                let avail = queue
                    .avail_idx(mem, Ordering::Acquire)
                    .map_err(|_| "cannot read avail index")?;
                let pending = avail - std::num::Wrapping(queue.next_avail());
                if pending.0 == 0 {
                    break;
                }
                if pending.0 > queue.size() {
                    return Err("avail index runs ahead of the queue size");
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    return Err("cannot read avail ring entry");
                };
                let head = chain.head_index();
                let parsed = parse_chain(chain).map_err(|_| "malformed descriptor chain")?;
                let used_len = exec.run(&parsed);
                queue
                    .add_used(mem, head, used_len)
                    .map_err(|_| "cannot add used entry")?;
                used_any = true;
            }
            // Re-enable notifications; if the driver added more meanwhile, go again.
            if !queue
                .enable_notification(mem)
                .map_err(|_| "cannot write used ring flags")?
            {
                break;
            }
        }
        Ok(used_any)
    }
}

impl QueueHandler for BlockHandler {
    fn process_queue(&mut self, index: usize) {
        if index != 0 || self.broken {
            return;
        }
        let queue = self.queue.clone();
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return;
        }
        match self.drain(&mut q) {
            Ok(true) => match q.needs_notification(&self.mem) {
                Ok(true) => {
                    BlockMetrics::add(&self.metrics.interrupts, 1);
                    self.interrupt.trigger(InterruptKind::Queue(0));
                }
                Ok(false) => {}
                Err(_) => {
                    drop(q);
                    self.mark_broken("cannot read used_event");
                }
            },
            Ok(false) => {}
            Err(why) => {
                drop(q);
                self.mark_broken(why);
            }
        }
    }
}
