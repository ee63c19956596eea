//! virtio-blk (virtio 1.2 §5.2) over a [`DiskBackend`], served by a worker thread.

mod handler;
mod metrics;
mod pool;
pub mod request;

use std::sync::Arc;

use disk::{DiskBackend, SECTOR_SHIFT};
use rate_limiter::SharedRateLimiter;
use virtio_bindings::virtio_blk::*;

pub use metrics::{BlockMetrics, BlockMetricsSnapshot};

use crate::device::{ActivateContext, VirtioDevice, VirtioDeviceState};
use crate::features::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1};
use crate::worker::Worker;
use crate::{device_type, Result, VirtioError};
use handler::BlockHandler;
use pool::Shared;
use request::Limits;

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// I/O threads per device by default: enough to keep a queue-depth-32 driver's requests
/// overlapping on the host without swamping small hosts with threads.
pub const DEFAULT_IO_THREADS: usize = 4;
/// Most sectors one DISCARD / WRITE_ZEROES segment may cover (2 GiB).
const MAX_DWZ_SECTORS: u32 = (1 << 31) >> SECTOR_SHIFT;
/// Segments per DISCARD / WRITE_ZEROES request.
const MAX_DWZ_SEG: u32 = 1;
/// Bytes in the configuration structure we expose (up to write_zeroes_may_unmap + padding).
const CONFIG_LEN: usize = 60;

/// A virtio block device.
pub struct Block {
    disk: Arc<dyn DiskBackend>,
    serial: Vec<u8>,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    limits: Limits,
    metrics: Arc<BlockMetrics>,
    io_threads: usize,
    limiter: Option<SharedRateLimiter>,
    shared: Option<Arc<Shared>>,
    worker: Option<Worker>,
}

impl Block {
    /// A block device on `disk`. `id` is the GET_ID serial (truncated to 20 bytes); without
    /// one, the disk's own serial (derived from the image file) is used.
    pub fn new(disk: impl DiskBackend + 'static, id: Option<&str>) -> Result<Self> {
        Self::with_backend(Arc::new(disk), id)
    }

    /// Like [`Block::new`] for an already shared backend.
    pub fn with_backend(disk: Arc<dyn DiskBackend>, id: Option<&str>) -> Result<Self> {
        let mut serial = id
            .map(str::to_string)
            .unwrap_or_else(|| disk.serial())
            .into_bytes();
        serial.truncate(VIRTIO_BLK_ID_BYTES as usize);
        let read_only = disk.is_read_only();
        let mut features = 1u64 << VIRTIO_F_VERSION_1
            | 1u64 << VIRTIO_F_RING_EVENT_IDX
            | 1u64 << VIRTIO_F_RING_INDIRECT_DESC
            | 1u64 << VIRTIO_BLK_F_BLK_SIZE
            | 1u64 << VIRTIO_BLK_F_SEG_MAX
            | 1u64 << VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1u64 << VIRTIO_BLK_F_DISCARD | 1u64 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let limits = Limits {
            seg_max: u32::from(QUEUE_SIZE) - 2,
            max_discard_sectors: MAX_DWZ_SECTORS,
            max_discard_seg: MAX_DWZ_SEG,
            max_write_zeroes_sectors: MAX_DWZ_SECTORS,
            max_write_zeroes_seg: MAX_DWZ_SEG,
        };
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |off: usize, b: &[u8]| config[off..off + b.len()].copy_from_slice(b);
        put(0, &(disk.size() >> SECTOR_SHIFT).to_le_bytes()); // capacity
        put(12, &limits.seg_max.to_le_bytes()); // seg_max
        put(20, &512u32.to_le_bytes()); // blk_size
        put(36, &limits.max_discard_sectors.to_le_bytes());
        put(40, &limits.max_discard_seg.to_le_bytes());
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &limits.max_write_zeroes_sectors.to_le_bytes());
        put(52, &limits.max_write_zeroes_seg.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        if disk.size() == 0 {
            return Err(VirtioError::InvalidState("disk is smaller than one sector"));
        }
        Ok(Self {
            disk,
            serial,
            avail_features: features,
            config,
            queue_sizes: [QUEUE_SIZE],
            limits,
            metrics: Arc::new(BlockMetrics::default()),
            io_threads: DEFAULT_IO_THREADS,
            limiter: None,
            shared: None,
            worker: None,
        })
    }

    /// Use `n` I/O threads to keep requests in flight in parallel (0: execute every request
    /// on the worker thread, one at a time). Takes effect at the next activation.
    pub fn with_io_threads(mut self, n: usize) -> Self {
        self.io_threads = n;
        self
    }

    /// Count into `metrics` (kept by the caller across device re-creations) instead of a
    /// fresh set of counters.
    pub fn with_metrics(mut self, metrics: Arc<BlockMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Limit the device's bandwidth and operations with `limiter` (kept by the caller across
    /// device re-creations, and changeable while the VM runs through its `update`).
    pub fn with_rate_limiter(mut self, limiter: SharedRateLimiter) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// The live counters (shared with the worker thread).
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() >> SECTOR_SHIFT
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Nothing is writable without VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        tracing::debug!("virtio-blk: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        if self.worker.is_some() {
            return Err(VirtioError::InvalidState("already active"));
        }
        let queue = ctx
            .queues
            .first()
            .cloned()
            .ok_or(VirtioError::InvalidState("no queue"))?;
        {
            let q = queue.lock().unwrap_or_else(|e| e.into_inner());
            if !virtio_queue::QueueT::ready(&*q) {
                return Err(VirtioError::InvalidQueue {
                    index: 0,
                    reason: "not enabled".into(),
                });
            }
        }
        let shared = Arc::new(
            Shared::new(
                ctx.mem,
                queue,
                self.disk.clone(),
                self.serial.clone(),
                ctx.acked_features,
                self.limits,
                self.metrics.clone(),
                ctx.interrupt,
                ctx.needs_reset,
            )
            .map_err(VirtioError::from)?,
        );
        let handler = BlockHandler::new(shared.clone(), self.io_threads)
            .map_err(VirtioError::from)?
            .with_limiter(self.limiter.clone());
        let events = ctx.queue_events.into_iter().take(1).collect();
        self.worker = Some(Worker::spawn("virtio-blk", events, handler)?);
        self.shared = Some(shared);
        Ok(())
    }

    fn reset(&mut self) {
        // Stopping the worker drops its handler, which cancels requests not yet started and
        // joins the I/O threads: after this returns nothing writes guest memory.
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        self.shared = None;
    }

    fn pause(&mut self) -> Result<()> {
        if let Some(w) = &self.worker {
            w.pause()?;
        }
        // The worker pops nothing more; let the requests in flight land in the used ring so
        // the saved queue state accounts for every request.
        if let Some(shared) = &self.shared {
            shared.wait_idle();
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        if let Some(w) = &self.worker {
            w.resume();
        }
        Ok(())
    }

    fn state(&self) -> VirtioDeviceState {
        VirtioDeviceState {
            device_type: device_type::BLOCK,
            avail_features: self.avail_features,
            config: self.config.to_vec(),
            specific: None,
        }
    }
}

#[cfg(test)]
mod tests;
