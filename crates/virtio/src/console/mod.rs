//! virtio-console (virtio 1.2 §5.3) with one port, the guest's `hvc0`: host input from a
//! socket client or a pty goes into the receiveq, the guest's output from the transmitq goes
//! to a file, the socket client or the pty.
//!
//! No MULTIPORT: Linux's driver (drivers/char/virtio_console.c) then uses queues 0 and 1 for
//! port 0 and makes it an hvc console, so `console=hvc0` works. VIRTIO_CONSOLE_F_SIZE is
//! offered with the configured columns and rows (`virtcons_probe` reads them for the hvc
//! window size).

pub mod backend;
mod handler;
mod metrics;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use backend::ConsoleBackend;
pub use handler::{ConsoleHandler, RX_QUEUE, TX_QUEUE};
pub use metrics::{ConsoleMetrics, ConsoleMetricsSnapshot};

use crate::device::{ActivateContext, VirtioDevice, VirtioDeviceState};
use crate::features::VIRTIO_F_VERSION_1;
use crate::worker::Worker;
use crate::{device_type, Result, VirtioError};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 128;
/// Feature bit: the configuration space holds cols/rows.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Bytes of configuration space: cols u16, rows u16, max_nr_ports u32, emerg_wr u32.
const CONFIG_LEN: usize = 12;

/// Console geometry reported to the guest (serialisable device state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

impl Default for ConsoleSize {
    fn default() -> Self {
        Self { cols: 80, rows: 24 }
    }
}

/// A virtio console with one port.
pub struct Console {
    backend: Arc<ConsoleBackend>,
    size: ConsoleSize,
    avail_features: u64,
    queue_sizes: [u16; 2],
    metrics: Arc<ConsoleMetrics>,
    worker: Option<Worker>,
}

impl Console {
    /// A console on `backend` (shared across VM instances of one run).
    pub fn new(backend: Arc<ConsoleBackend>, size: ConsoleSize) -> Self {
        Self {
            backend,
            size,
            avail_features: 1u64 << VIRTIO_F_VERSION_1 | 1u64 << VIRTIO_CONSOLE_F_SIZE,
            queue_sizes: [QUEUE_SIZE; 2],
            metrics: Arc::new(ConsoleMetrics::default()),
            worker: None,
        }
    }

    /// Use `metrics` (kept across VM reboots by the caller) instead of fresh counters.
    pub fn with_metrics(mut self, metrics: Arc<ConsoleMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The live counters (shared with the worker thread).
    pub fn metrics(&self) -> Arc<ConsoleMetrics> {
        self.metrics.clone()
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..2].copy_from_slice(&self.size.cols.to_le_bytes());
        c[2..4].copy_from_slice(&self.size.rows.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        c
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, which is not offered.
        tracing::debug!("virtio-console: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        if self.worker.is_some() {
            return Err(VirtioError::InvalidState("already active"));
        }
        let (Some(rx), Some(tx)) = (ctx.queues.get(RX_QUEUE), ctx.queues.get(TX_QUEUE)) else {
            return Err(VirtioError::InvalidState("console needs two queues"));
        };
        let handler = ConsoleHandler::new(
            ctx.mem,
            rx.clone(),
            tx.clone(),
            self.backend.clone(),
            self.metrics.clone(),
            ctx.interrupt,
            ctx.needs_reset,
        )?;
        let events = ctx.queue_events.into_iter().take(2).collect();
        self.worker = Some(Worker::spawn("virtio-console", events, handler)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }

    fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    fn state(&self) -> VirtioDeviceState {
        VirtioDeviceState {
            device_type: device_type::CONSOLE,
            avail_features: self.avail_features,
            config: self.config().to_vec(),
            specific: None,
        }
    }
}

#[cfg(test)]
mod tests;
