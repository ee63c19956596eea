//! Serial port counters.

use crate::counter::Counter;

/// Counters of one UART, shared (`Arc`) between the device and the metrics reporter.
#[derive(Debug, Default, serde::Serialize)]
pub struct SerialMetrics {
    /// Bytes the guest wrote that reached the output sink.
    pub tx_bytes: Counter,
    /// Bytes the guest wrote that were lost (sink full, closed or failing).
    pub tx_lost_bytes: Counter,
    /// Host input bytes accepted into the receive FIFO.
    pub rx_bytes: Counter,
    /// Host input bytes discarded by [`super::Serial::enqueue_input_lossy`].
    pub rx_dropped_bytes: Counter,
    /// Times host input found the receive FIFO full (or the UART in loopback mode).
    pub rx_fifo_full: Counter,
    /// Bytes the guest read from the receive buffer register.
    pub rx_reads: Counter,
    /// Guest accesses outside the 8 UART registers.
    pub invalid_accesses: Counter,
}
