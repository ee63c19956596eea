//! virtio-balloon (virtio 1.2 §5.5): the host asks the guest to give memory back by raising
//! the target (`num_pages`); the guest hands over 4 KiB pages on the inflate queue, and the
//! device returns them to the host with madvise(MADV_DONTNEED) (guest RAM is an anonymous
//! private mapping, so the pages are freed at once and refault as zero pages if touched).
//! Deflating is only accounting: the guest touches its pages again and the host faults them
//! back in.
//!
//! Optional parts, all offered by default:
//! - the statistics queue (VIRTIO_BALLOON_F_STATS_VQ): the device keeps the driver's stats
//!   buffer and gives it back (used) whenever it wants fresh numbers (periodically and when
//!   the host asks), so the driver refills and re-queues it;
//! - VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may deflate below the target when it runs out
//!   of memory (a driver behaviour; the device only offers it);
//! - free page reporting (VIRTIO_BALLOON_F_REPORTING): the guest lends free ranges, which
//!   the device releases like inflated pages before handing the buffers back.
//!
//! Queue indices are compact, as Linux and QEMU use them: inflateq 0, deflateq 1, then statsq
//! if STATS_VQ was negotiated, then reporting_vq if REPORTING was (so 2 or 3).

mod handler;
mod metrics;
pub mod release;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use handler::{BalloonHandler, QueueRole};
pub use metrics::{BalloonMetrics, BalloonMetricsSnapshot};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{
    ActivateContext, DeviceSpecificState, InterruptKind, VirtioDevice, VirtioDeviceState,
    VirtioInterrupt,
};
use crate::features::VIRTIO_F_VERSION_1;
use crate::worker::Worker;
use crate::{device_type, Result, VirtioError};

/// The balloon's page size (fixed by the spec, whatever the guest's page size).
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Size of every queue.
pub const QUEUE_SIZE: u16 = 128;
/// Bytes of page numbers read from one inflate/deflate chain (16384 pages, 64 MiB); the rest
/// of a larger chain is ignored, which bounds the work one guest buffer can ask for.
pub const MAX_PFN_BYTES: u64 = 64 * 1024;
/// Bytes of one statistics entry (le16 tag, le64 value, packed).
pub const STAT_ENTRY_BYTES: usize = 10;
/// Statistics entries read from one buffer; more are ignored.
pub const MAX_STAT_ENTRIES: usize = 64;

/// Feature bits of virtio-balloon (virtio 1.2 §5.5.3).
pub mod features {
    /// The host must be told before pages are used after deflation.
    pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
    /// A statistics queue is present.
    pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
    /// The guest deflates the balloon when it runs out of memory.
    pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
    /// Free page hinting (not offered).
    pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
    /// Page poisoning (not offered).
    pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
    /// Free page reporting queue is present.
    pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
}

/// "The device holds no statistics buffer".
const NO_HEAD: u32 = u32::MAX;

/// Names of the statistics tags (virtio 1.2 §5.5.6.3, plus the ones Linux added later);
/// index = tag.
pub const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
];

/// The name of statistics tag `tag` (`tag_N` for tags this device does not know).
pub fn stat_name(tag: u16) -> String {
    STAT_NAMES
        .get(tag as usize)
        .map_or_else(|| format!("tag_{tag}"), |s| (*s).to_string())
}

/// Which optional parts the device offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonOptions {
    /// Offer the statistics queue.
    pub stats: bool,
    /// Ask the guest for fresh statistics this often (None: only when the host asks).
    pub stats_period: Option<Duration>,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub reporting: bool,
}

impl Default for BalloonOptions {
    fn default() -> Self {
        Self {
            stats: true,
            stats_period: Some(Duration::from_secs(1)),
            deflate_on_oom: true,
            reporting: true,
        }
    }
}

/// The guest's latest memory statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStats {
    /// When the device received them.
    pub received: Instant,
    /// (tag, value) pairs in the order the guest sent them.
    pub entries: Vec<(u16, u64)>,
}

/// State shared by the device model, its worker and the host's control handle. Created once
/// per run, so the target survives guest reboots.
pub struct BalloonShared {
    options: BalloonOptions,
    /// Pages the host wants in the balloon (`num_pages`).
    target_pages: AtomicU32,
    /// Pages the guest says are in the balloon (`actual`).
    actual_pages: AtomicU32,
    stats: Mutex<Option<GuestStats>>,
    /// Head of the statistics buffer the device holds ([`NO_HEAD`]: none).
    stats_head: AtomicU32,
    /// Set while a driver is active: raises configuration-change interrupts.
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    /// Written by the host to ask for fresh statistics; the worker watches it.
    stats_request: EventFd,
    metrics: Arc<BalloonMetrics>,
}

impl BalloonShared {
    /// Shared state for a device with `options`, target 0.
    pub fn new(options: BalloonOptions) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            options,
            target_pages: AtomicU32::new(0),
            actual_pages: AtomicU32::new(0),
            stats: Mutex::new(None),
            stats_head: AtomicU32::new(NO_HEAD),
            interrupt: Mutex::new(None),
            stats_request: EventFd::new(EFD_NONBLOCK)?,
            metrics: Arc::new(BalloonMetrics::default()),
        }))
    }

    /// What the device offers.
    pub fn options(&self) -> BalloonOptions {
        self.options
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<BalloonMetrics> {
        self.metrics.clone()
    }

    /// Pages the host wants in the balloon.
    pub fn target_pages(&self) -> u32 {
        self.target_pages.load(Ordering::Acquire)
    }

    /// Pages the guest reports in the balloon.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages.load(Ordering::Acquire)
    }

    /// Set the target and tell the guest (configuration-change interrupt) if a driver is
    /// active; otherwise the driver reads it when it starts.
    pub fn set_target_pages(&self, pages: u32) {
        self.target_pages.store(pages, Ordering::Release);
        let irq = self
            .interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(irq) = irq {
            BalloonMetrics::add(&self.metrics.interrupts, 1);
            irq.trigger(InterruptKind::Config);
        }
    }

    /// The guest's latest statistics, if it sent any.
    pub fn stats(&self) -> Option<GuestStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ask the guest for fresh statistics (the worker gives the stats buffer back).
    pub fn request_stats(&self) {
        if let Err(e) = self.stats_request.write(1) {
            tracing::warn!("virtio-balloon: cannot request statistics: {e}");
        }
    }

    fn set_stats(&self, entries: Vec<(u16, u64)>) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(GuestStats {
            received: Instant::now(),
            entries,
        });
    }

    /// Head of the statistics buffer the device holds, if any.
    pub fn stats_head(&self) -> Option<u16> {
        u16::try_from(self.stats_head.load(Ordering::Acquire)).ok()
    }

    /// Record the held statistics buffer (None: given back); returns the previous one.
    fn replace_stats_head(&self, head: Option<u16>) -> Option<u16> {
        let v = head.map_or(NO_HEAD, u32::from);
        u16::try_from(self.stats_head.swap(v, Ordering::AcqRel)).ok()
    }

    fn set_interrupt(&self, irq: Option<Arc<dyn VirtioInterrupt>>) {
        *self.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = irq;
    }
}

/// Balloon-specific state for snapshots (the transport saves the queues).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// `num_pages`.
    pub target_pages: u32,
    /// `actual`.
    pub actual_pages: u32,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted (0 before activation).
    pub acked_features: u64,
    /// Head of the driver's statistics buffer the device holds (to give back after a
    /// restore).
    pub stats_head: Option<u16>,
}

/// A virtio memory balloon.
pub struct Balloon {
    shared: Arc<BalloonShared>,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    worker: Option<Worker>,
}

impl Balloon {
    /// A balloon over `shared` (which carries the options, target and counters).
    pub fn new(shared: Arc<BalloonShared>) -> Self {
        let o = shared.options();
        let mut avail_features = 1u64 << VIRTIO_F_VERSION_1;
        let mut queues = 2;
        if o.stats {
            avail_features |= 1 << features::VIRTIO_BALLOON_F_STATS_VQ;
            queues += 1;
        }
        if o.deflate_on_oom {
            avail_features |= 1 << features::VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if o.reporting {
            avail_features |= 1 << features::VIRTIO_BALLOON_F_REPORTING;
            queues += 1;
        }
        Self {
            shared,
            avail_features,
            acked_features: 0,
            queue_sizes: vec![QUEUE_SIZE; queues],
            worker: None,
        }
    }

    /// Balloon-specific state for snapshots.
    pub fn balloon_state(&self) -> BalloonState {
        BalloonState {
            target_pages: self.shared.target_pages(),
            actual_pages: self.shared.actual_pages(),
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            stats_head: self.shared.stats_head(),
        }
    }

    fn config_bytes(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&self.shared.target_pages().to_le_bytes());
        c[4..].copy_from_slice(&self.shared.actual_pages().to_le_bytes());
        c
    }
}

/// The role of each queue index given the negotiated features (compact numbering).
pub fn queue_roles(acked_features: u64) -> Vec<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if acked_features & (1 << features::VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push(QueueRole::Stats);
    }
    if acked_features & (1 << features::VIRTIO_BALLOON_F_REPORTING) != 0 {
        roles.push(QueueRole::Reporting);
    }
    roles
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is driver-writable.
        let mut actual = self.shared.actual_pages().to_le_bytes();
        let mut touched = false;
        for (i, &b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(o @ 4..=7) => {
                    actual[(o - 4) as usize] = b;
                    touched = true;
                }
                _ => tracing::debug!("virtio-balloon: ignored config write at {offset:#x}"),
            }
        }
        if touched {
            self.shared
                .actual_pages
                .store(u32::from_le_bytes(actual), Ordering::Release);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        if self.worker.is_some() {
            return Err(VirtioError::InvalidState("already active"));
        }
        let roles = queue_roles(ctx.acked_features);
        if ctx.queues.len() < roles.len() {
            return Err(VirtioError::InvalidState("fewer queues than features need"));
        }
        let stats_request = self.shared.stats_request.try_clone()?;
        let handler = BalloonHandler::new(
            ctx.mem,
            ctx.queues.into_iter().take(roles.len()).collect(),
            roles.clone(),
            self.shared.clone(),
            ctx.interrupt.clone(),
            ctx.needs_reset,
        )
        .with_stats_events(stats_request, self.shared.options.stats_period);
        let events = ctx.queue_events.into_iter().take(roles.len()).collect();
        self.acked_features = ctx.acked_features;
        self.worker = Some(Worker::spawn("virtio-balloon", events, handler)?);
        self.shared.set_interrupt(Some(ctx.interrupt));
        Ok(())
    }

    fn reset(&mut self) {
        self.shared.set_interrupt(None);
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        // A reset driver has forgotten its balloon: every page is the guest's again.
        self.shared.actual_pages.store(0, Ordering::Release);
        self.shared.replace_stats_head(None);
        self.acked_features = 0;
    }

    fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    fn state(&self) -> VirtioDeviceState {
        VirtioDeviceState {
            device_type: device_type::BALLOON,
            avail_features: self.avail_features,
            config: self.config_bytes().to_vec(),
            specific: Some(DeviceSpecificState::Balloon(self.balloon_state())),
        }
    }

    /// Target, actual and the held statistics buffer come back, so the guest's view of its
    /// balloon stays true and the statistics keep flowing (the device gives the buffer it
    /// held back at the next request).
    fn restored(&mut self, state: &VirtioDeviceState) -> Result<()> {
        let Some(DeviceSpecificState::Balloon(saved)) = &state.specific else {
            // A snapshot without balloon state: start from zero, as a fresh device.
            return Ok(());
        };
        if saved.avail_features != self.avail_features {
            return Err(VirtioError::InvalidSnapshot(format!(
                "balloon features {:#x} differ from this device's {:#x}: start it with the \
                 same --balloon options",
                saved.avail_features, self.avail_features
            )));
        }
        if saved.stats_head.is_some_and(|h| h >= QUEUE_SIZE) {
            return Err(VirtioError::InvalidSnapshot(
                "balloon statistics buffer index outside the queue".into(),
            ));
        }
        self.shared
            .target_pages
            .store(saved.target_pages, Ordering::Release);
        self.shared
            .actual_pages
            .store(saved.actual_pages, Ordering::Release);
        self.shared.replace_stats_head(saved.stats_head);
        Ok(())
    }
}

impl Drop for Balloon {
    fn drop(&mut self) {
        self.shared.set_interrupt(None);
    }
}

#[cfg(test)]
mod tests;
