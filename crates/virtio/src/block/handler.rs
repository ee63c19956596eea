//! The virtio-blk worker's queue processing: pop chains, hand them to the I/O pool (or run
//! them inline when the device has no pool), and wake up again when a throttled queue may
//! continue. Notifications are disabled while the worker drains (EVENT_IDX's avail_event
//! when negotiated) and completions interrupt only when the driver asked to be told.
//!
//! With a rate limiter each request costs one operation and its data bytes. A request the
//! limiter refuses is put back on the avail ring (`go_to_previous_position`) and the worker
//! stops draining; the limiter's timer (registered in the worker's epoll set) resumes it.
//! Guest kicks meanwhile find the limiter blocked and return at once: with EVENT_IDX the
//! driver may not kick again, so only the timer is relied on.
//!
//! Small reads served from the host page cache and small buffered writes run on the worker
//! itself (`Executor::try_run_inline`): a thread hand-off and its wake-ups cost more than the
//! copy. Such a request completes before the next one is popped, so a later FLUSH (which goes
//! to the pool) covers it. After [`INLINE_BATCH`] inline completions the worker publishes them
//! with one interrupt decision and continues through its event loop (its wake-up eventfd), so
//! pause and stop are never held off by a guest that keeps the queue full.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use rate_limiter::SharedRateLimiter;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::metrics::BlockMetrics;
use super::pool::{IoPool, Job, Shared};
use super::request::{parse_chain, ParsedChain};
use crate::device::InterruptKind;
use crate::worker::{EventControl, EventSet, QueueHandler};

/// Token of the pool's wake-up eventfd.
const WAKE_TOKEN: u32 = 0;
/// Token of the rate limiter's timer.
const LIMITER_TOKEN: u32 = 1;
/// Bytes of a request that are not data: the 16-byte header and the status byte.
const REQUEST_OVERHEAD: u64 = 17;
/// Most requests the worker completes itself before it publishes them with one interrupt
/// decision and goes on draining.
const INLINE_BATCH: usize = 32;

/// State the worker thread owns.
pub struct BlockHandler {
    /// State shared with the I/O threads and the device.
    pub shared: Arc<Shared>,
    /// The I/O threads; `None` runs every request on the worker thread.
    pool: Option<IoPool>,
    /// Bandwidth / IOPS limit (shared with the control socket).
    limiter: Option<SharedRateLimiter>,
}

/// The data bytes a request moves (what the bandwidth bucket is charged): everything in the
/// chain but the header and the status byte.
fn data_bytes(chain: &ParsedChain) -> u64 {
    let sum =
        |segs: &[super::request::Segment]| segs.iter().fold(0u64, |a, s| a.saturating_add(s.len));
    sum(&chain.readable)
        .saturating_add(sum(&chain.writable))
        .saturating_sub(REQUEST_OVERHEAD)
}

/// Why draining stopped early.
enum Stop {
    /// The driver broke the queue.
    Broken(&'static str),
}

/// What one drain did.
struct Drained {
    /// Used entries were added by the worker itself (the interrupt decision is the caller's;
    /// pool completions notify on their own).
    used_any: bool,
    /// The drain stopped after [`INLINE_BATCH`] inline completions with requests left.
    more: bool,
}

impl BlockHandler {
    /// A handler with `io_threads` I/O threads (0: execute on the worker thread).
    pub fn new(shared: Arc<Shared>, io_threads: usize) -> std::io::Result<Self> {
        let pool = if io_threads == 0 {
            None
        } else {
            Some(IoPool::spawn(io_threads, shared.clone())?)
        };
        Ok(Self {
            shared,
            pool,
            limiter: None,
        })
    }

    /// Charge every request to `limiter` (bytes and operations).
    pub fn with_limiter(mut self, limiter: Option<SharedRateLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// Pop and dispatch everything available (or until [`INLINE_BATCH`] requests were
    /// completed inline). With I/O threads, small reads whose data is in the host page cache
    /// and small writes the page cache takes are executed here at once (no hand-off to a pool
    /// thread, one interrupt decision per batch); everything else goes to the pool.
    fn drain(&mut self, queue: &mut Queue) -> Result<Drained, Stop> {
        let shared = &*self.shared;
        let mem = &shared.mem;
        let mut used_any = false;
        let mut inline = 0usize;
        let done = |used_any| {
            Ok(Drained {
                used_any,
                more: false,
            })
        };
        loop {
            queue
                .disable_notification(mem)
                .map_err(|_| Stop::Broken("cannot write used ring flags"))?;
            loop {
                // A driver can never have more than a queue's worth of requests outstanding;
                // one that republishes heads still in flight is held back here.
                if self.pool.is_some() && shared.throttle_if_full(usize::from(queue.size())) {
                    return done(used_any);
                }
                if inline >= INLINE_BATCH {
                    return Ok(Drained {
                        used_any,
                        more: true,
                    });
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
                if self.limiter.as_ref().is_some_and(|l| l.is_blocked()) {
                    // The timer resumes us; leave the request where it is.
                    return done(used_any);
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    return Err(Stop::Broken("cannot read avail ring entry"));
                };
                let head = chain.head_index();
                let parsed =
                    parse_chain(chain).map_err(|_| Stop::Broken("malformed descriptor chain"))?;
                if let Some(l) = &self.limiter {
                    if !l.consume_request(data_bytes(&parsed), 1) {
                        // Served once the limiter's timer fires.
                        queue.go_to_previous_position();
                        return done(used_any);
                    }
                }
                match &self.pool {
                    Some(pool) => {
                        if let Some(used_len) = shared.executor().try_run_inline(&parsed) {
                            queue
                                .add_used(mem, head, used_len)
                                .map_err(|_| Stop::Broken("cannot add used entry"))?;
                            used_any = true;
                            inline += 1;
                            continue;
                        }
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
        done(used_any)
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
        let drained = match self.drain(&mut q) {
            Ok(d) => d,
            Err(Stop::Broken(why)) => {
                drop(q);
                self.shared.mark_broken(why);
                return;
            }
        };
        if drained.used_any {
            match q.needs_notification(&self.shared.mem) {
                Ok(true) => {
                    drop(q);
                    BlockMetrics::add(&self.shared.metrics.interrupts, 1);
                    self.shared.interrupt.trigger(InterruptKind::Queue(0));
                }
                Ok(false) => drop(q),
                Err(_) => {
                    drop(q);
                    self.shared.mark_broken("cannot read used_event");
                    return;
                }
            }
        } else {
            drop(q);
        }
        if drained.more {
            // Come back through the event loop, so pause and stop are seen between batches.
            if let Err(e) = self.shared.wake.write(1) {
                tracing::error!("virtio-blk: cannot wake the worker: {e}");
            }
        }
    }

    fn register(&mut self, ctl: &EventControl<'_>) -> std::io::Result<()> {
        ctl.add(self.shared.wake.as_raw_fd(), EventSet::IN, WAKE_TOKEN)?;
        if let Some(l) = &self.limiter {
            ctl.add(l.timer_fd(), EventSet::IN, LIMITER_TOKEN)?;
        }
        Ok(())
    }

    fn process_event(&mut self, token: u32, _events: EventSet, _ctl: &EventControl<'_>) {
        match token {
            WAKE_TOKEN => {
                let _ = self.shared.wake.read();
                self.process_queue(0);
            }
            LIMITER_TOKEN => {
                if let Some(l) = &self.limiter {
                    if let Err(e) = l.timer_event() {
                        tracing::warn!("virtio-blk: rate limiter timer: {e}");
                    }
                }
                self.process_queue(0);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use disk::RawDisk;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_device::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::block::request::Limits;
    use crate::device::VirtioInterrupt;
    use crate::features::VIRTIO_F_RING_EVENT_IDX;
    use crate::worker::Worker;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct NoInterrupt;
    impl VirtioInterrupt for NoInterrupt {
        fn trigger(&self, _kind: InterruptKind) {}
    }

    /// Three-descriptor reads of sector `i` at descriptors 3i..3i+2.
    fn reads(mem: &GuestMemoryMmap, n: u16) -> Vec<RawDescriptor> {
        let d = |addr: u64, len: u32, flags: u32, next: u16| {
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
        };
        let mut v = Vec::new();
        for i in 0..n {
            let hdr = HDR + u64::from(i) * 16;
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            bytes[8..].copy_from_slice(&u64::from(i).to_le_bytes());
            mem.write_slice(&bytes, GuestAddress(hdr)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUS + u64::from(i)))
                .unwrap();
            let first = i * 3;
            v.push(d(hdr, 16, VRING_DESC_F_NEXT, first + 1));
            v.push(d(
                DATA + u64::from(i) * 512,
                512,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                first + 2,
            ));
            v.push(d(STATUS + u64::from(i), 1, VRING_DESC_F_WRITE, 0));
        }
        v
    }

    /// Poll `cond` every millisecond; the 20 s bound is a hang guard, not a threshold.
    fn wait(what: &str, cond: &dyn Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "gave up on {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// An inline (no I/O threads) handler for `q` with EVENT_IDX negotiated and `limiter`.
    fn limited_handler(
        mem: &GuestMemoryMmap,
        q: Queue,
        file: &TempFile,
        limiter: &SharedRateLimiter,
    ) -> BlockHandler {
        file.as_file().set_len(64 * 512).unwrap();
        let disk: Arc<dyn disk::DiskBackend> =
            Arc::new(RawDisk::open(file.as_path(), false).unwrap());
        let limits = Limits {
            seg_max: 254,
            max_discard_sectors: 1,
            max_discard_seg: 1,
            max_write_zeroes_sectors: 1,
            max_write_zeroes_seg: 1,
        };
        let shared = Shared::new(
            mem.clone(),
            Arc::new(Mutex::new(q)),
            disk,
            b"serial".to_vec(),
            1u64 << VIRTIO_F_RING_EVENT_IDX,
            limits,
            Arc::default(),
            Arc::new(NoInterrupt),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        BlockHandler::new(Arc::new(shared), 0)
            .unwrap()
            .with_limiter(Some(limiter.clone()))
    }

    fn ops_limiter(per_period: u64, refill_time_ms: u64) -> SharedRateLimiter {
        SharedRateLimiter::new(&rate_limiter::RateLimitConfig {
            bandwidth: None,
            ops: Some(rate_limiter::BucketConfig {
                size: per_period,
                one_time_burst: 0,
                refill_time_ms,
            }),
        })
        .unwrap()
    }

    #[test]
    fn test_blk_limit_lifted_by_update_resumes_blocked_queue() {
        // Arrange: one request per ~12 days, so the second read waits on the limiter.
        let file = TempFile::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        vq.add_desc_chains(&reads(&mem, 2), 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        let limiter = ops_limiter(1, 1 << 30);
        let handler = limited_handler(&mem, q, &file, &limiter);
        let bell = EventFd::new(EFD_NONBLOCK).unwrap();
        let _worker = Worker::spawn("blk-test", vec![bell], handler).unwrap();
        wait("first read", &|| vq.used().idx().load() >= 1);
        wait("limiter blocked", &|| limiter.is_blocked());
        let used_while_blocked = vq.used().idx().load();

        // Act: what the control socket does for `rate-limit` without limits.
        limiter.update(&rate_limiter::RateLimitConfig::default());
        wait("second read", &|| vq.used().idx().load() == 2);

        // Assert
        assert_eq!(used_while_blocked, 1);
        assert!(limiter.config().is_unlimited());
    }

    #[test]
    fn test_blk_limited_queue_resumes_on_timer_without_kick() {
        // Arrange: one request per 300 ms, EVENT_IDX negotiated, two reads queued.
        let file = TempFile::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        vq.add_desc_chains(&reads(&mem, 2), 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        let start = std::time::Instant::now();
        let limiter = ops_limiter(1, 300);
        let handler = limited_handler(&mem, q, &file, &limiter);

        // Act: the worker's first drain is the only kick; nothing rings afterwards.
        let bell = EventFd::new(EFD_NONBLOCK).unwrap();
        let _worker = Worker::spawn("blk-test", vec![bell], handler).unwrap();
        wait("first read", &|| vq.used().idx().load() >= 1);
        wait("second read", &|| vq.used().idx().load() == 2);

        // Assert: both served; the second cannot have come before its token (300 ms after
        // the first; the bound is generous).
        for i in 0..2u64 {
            let status: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
            assert_eq!(status, VIRTIO_BLK_S_OK as u8, "request {i}");
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= std::time::Duration::from_millis(200),
            "second read served after {elapsed:?}: the limiter did not hold it"
        );
    }
}
