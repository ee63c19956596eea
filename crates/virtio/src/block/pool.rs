//! Requests in flight: a small pool of I/O threads executes parsed requests in parallel and
//! publishes each one in the used ring as soon as it finishes (virtio 1.2 §2.7.8: the used
//! ring may be filled in any order), so a driver at queue depth 32 keeps the disk busy.
//!
//! Guest data still moves straight between the disk and guest memory
//! (`DiskBackend::read_to_guest` / `write_from_guest`); the pool only changes which thread
//! does it. Dropping the pool cancels requests not yet started and joins the threads, so no
//! I/O thread touches guest memory after the device was reset.
//!
//! Costs per request are kept low because on small (and nested) hosts a thread wake-up costs
//! more than a page-cache read: jobs wait in one queue that a busy I/O thread keeps taking from
//! without sleeping, and a sleeping thread is woken only when a job arrives and no wake-up is
//! already on its way. A thread that has more jobs queued behind the one it just finished
//! publishes the used entry at once but defers the interrupt decision (at most
//! [`MAX_DEFERRED`] completions), so a burst of completions costs one interrupt.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use disk::DiskBackend;
use virtio_queue::{Queue, QueueT};
use vm_device::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::BlockMetrics;
use super::request::{Executor, Limits, ParsedChain};
use crate::device::{InterruptKind, VirtioInterrupt};

/// One popped request waiting for (or under) execution.
pub struct Job {
    /// Head descriptor index, for the used entry.
    pub head: u16,
    /// The walked chain.
    pub chain: ParsedChain,
}

/// State shared by the worker thread, the I/O threads and the device (for pause).
pub struct Shared {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The request queue (also locked by the transport).
    pub queue: Arc<Mutex<Queue>>,
    /// The disk.
    pub disk: Arc<dyn DiskBackend>,
    /// GET_ID answer.
    pub serial: Vec<u8>,
    /// Negotiated features.
    pub acked_features: u64,
    /// Advertised limits.
    pub limits: Limits,
    /// Counters.
    pub metrics: Arc<BlockMetrics>,
    /// Interrupt sink.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Raised when the driver broke the queue.
    pub needs_reset: Arc<AtomicBool>,
    broken: AtomicBool,
    in_flight: Mutex<usize>,
    idle: Condvar,
    throttled: AtomicBool,
    cancelled: AtomicBool,
    /// Written when the worker should look at the queue again (a throttled worker after a
    /// completion).
    pub wake: EventFd,
}

impl Shared {
    /// Shared state for one activation.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemoryMmap,
        queue: Arc<Mutex<Queue>>,
        disk: Arc<dyn DiskBackend>,
        serial: Vec<u8>,
        acked_features: u64,
        limits: Limits,
        metrics: Arc<BlockMetrics>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            mem,
            queue,
            disk,
            serial,
            acked_features,
            limits,
            metrics,
            interrupt,
            needs_reset,
            broken: AtomicBool::new(false),
            in_flight: Mutex::new(0),
            idle: Condvar::new(),
            throttled: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// An executor over this state.
    pub fn executor(&self) -> Executor<'_> {
        Executor {
            mem: &self.mem,
            disk: &*self.disk,
            serial: &self.serial,
            acked_features: self.acked_features,
            limits: self.limits,
            metrics: &self.metrics,
        }
    }

    /// Whether the driver broke the queue.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// The driver broke the queue: stop serving it and ask for a reset.
    pub fn mark_broken(&self, why: &str) {
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!("virtio-blk: queue broken by the driver: {why}; device needs reset");
        BlockMetrics::add(&self.metrics.broken_queues, 1);
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.trigger(InterruptKind::Config);
    }

    /// Whether the device is being reset (requests not yet started are dropped).
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Requests popped and not yet completed.
    pub fn in_flight(&self) -> usize {
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count a request as in flight.
    pub fn begin(&self) {
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    /// A request left flight (completed or cancelled).
    fn finish(&self) {
        let mut n = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
        drop(n);
        if self.throttled.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.wake.write(1) {
                tracing::error!("virtio-blk: cannot wake the worker: {e}");
            }
        }
    }

    /// The worker stops popping while `limit` requests are in flight; returns true if it
    /// must stop (a completion will wake it), false if a slot is free.
    pub fn throttle_if_full(&self, limit: usize) -> bool {
        if self.in_flight() < limit {
            return false;
        }
        self.throttled.store(true, Ordering::Release);
        // A completion between the check and the store would have missed the flag.
        if self.in_flight() < limit {
            self.throttled.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// Block until no request is in flight (every completion is in the used ring).
    pub fn wait_idle(&self) {
        let mut n = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Publish a finished request in the used ring; with `notify`, also interrupt the guest
    /// if it asked to be told (EVENT_IDX's used_event, else every time) about this or any
    /// earlier entry whose decision was deferred. Called with the queue unlocked.
    fn complete(&self, head: u16, used_len: u32, notify: bool) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_broken() || !q.ready() {
            return;
        }
        if q.add_used(&self.mem, head, used_len).is_err() {
            drop(q);
            self.mark_broken("cannot add used entry");
            return;
        }
        if notify {
            self.notify_locked(q);
        }
    }

    /// Interrupt the guest if entries published since the last decision need it.
    fn notify(&self) {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_broken() || !q.ready() {
            return;
        }
        self.notify_locked(q);
    }

    fn notify_locked(&self, mut q: std::sync::MutexGuard<'_, Queue>) {
        match q.needs_notification(&self.mem) {
            Ok(true) => {
                drop(q);
                BlockMetrics::add(&self.metrics.interrupts, 1);
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

/// Most completions whose interrupt decision a busy I/O thread defers.
const MAX_DEFERRED: usize = 4;

/// Jobs waiting for an I/O thread.
#[derive(Default)]
struct JobQueue {
    jobs: VecDeque<Job>,
    /// Threads waiting on the condition variable.
    idle: usize,
    /// Wake-ups sent and not yet consumed by a waiting thread.
    waking: usize,
    /// No more jobs will come: threads exit once the queue is empty.
    closed: bool,
}

struct Jobs {
    state: Mutex<JobQueue>,
    ready: Condvar,
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, JobQueue> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Next job, sleeping while there is none; `None` once closed and drained.
    fn take(&self) -> Option<Job> {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            st.idle -= 1;
            st.waking = st.waking.saturating_sub(1);
        }
    }

    /// The next job if one is waiting, without sleeping.
    fn try_take(&self) -> Option<Job> {
        self.lock().jobs.pop_front()
    }

    /// Whether another job is waiting (a hint for deferring interrupts).
    fn has_more(&self) -> bool {
        !self.lock().jobs.is_empty()
    }
}

/// The I/O threads of one activation.
pub struct IoPool {
    jobs: Arc<Jobs>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl IoPool {
    /// Start `threads` (at least one) I/O threads serving `shared`.
    pub fn spawn(threads: usize, shared: Arc<Shared>) -> std::io::Result<Self> {
        let jobs = Arc::new(Jobs {
            state: Mutex::new(JobQueue::default()),
            ready: Condvar::new(),
        });
        let mut pool = Self {
            jobs: jobs.clone(),
            threads: Vec::new(),
            shared: shared.clone(),
        };
        for i in 0..threads.max(1) {
            let jobs = jobs.clone();
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("virtio-blk-io{i}"))
                .spawn(move || io_thread(&jobs, &shared))?;
            // On error the threads already started are joined by Drop.
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// Queue a request; the caller already counted it with [`Shared::begin`].
    pub fn submit(&self, job: Job) {
        let mut st = self.jobs.lock();
        if st.closed {
            // Cannot happen while the pool lives: never leave the request counted, or
            // pause would wait forever.
            drop(st);
            tracing::error!("virtio-blk: I/O threads gone; request dropped");
            self.shared.finish();
            return;
        }
        st.jobs.push_back(job);
        // Wake a sleeping thread only if the jobs queued outnumber the wake-ups under way;
        // busy threads take the rest without sleeping.
        let wake = st.idle > st.waking && st.jobs.len() > st.waking;
        if wake {
            st.waking += 1;
        }
        drop(st);
        if wake {
            self.jobs.ready.notify_one();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.cancelled.store(true, Ordering::Release);
        self.jobs.lock().closed = true;
        self.jobs.ready.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("virtio-blk I/O thread panicked");
            }
        }
    }
}

fn io_thread(jobs: &Jobs, shared: &Shared) {
    let mut deferred = 0usize;
    loop {
        let job = match jobs.try_take() {
            Some(job) => job,
            None => {
                // Never sleep on a deferred interrupt decision.
                if deferred > 0 {
                    shared.notify();
                    deferred = 0;
                }
                match jobs.take() {
                    Some(job) => job,
                    None => return,
                }
            }
        };
        // After a reset began, requests not yet started are dropped unexecuted.
        if !shared.cancelled() && !shared.is_broken() {
            let used_len = shared.executor().run(&job.chain);
            let defer = deferred < MAX_DEFERRED && jobs.has_more();
            shared.complete(job.head, used_len, !defer);
            deferred = if defer { deferred + 1 } else { 0 };
        } else if deferred > 0 {
            shared.notify();
            deferred = 0;
        }
        shared.finish();
    }
}
