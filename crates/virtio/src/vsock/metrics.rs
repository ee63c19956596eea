//! Per-device counters (lock-free; read by the VMM's metrics endpoint).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! vsock_metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Live counters of one vsock device.
        #[derive(Debug, Default)]
        pub struct VsockMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A serialisable copy of [`VsockMetrics`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct VsockMetricsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl VsockMetrics {
            /// Copy the counters.
            pub fn snapshot(&self) -> VsockMetricsSnapshot {
                VsockMetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

vsock_metrics! {
    /// Packets taken from the TX queue.
    tx_packets,
    /// Payload bytes the guest sent (RW).
    tx_bytes,
    /// Packets written to the RX queue.
    rx_packets,
    /// Payload bytes delivered to the guest (RW).
    rx_bytes,
    /// Guest packets dropped silently (short header, wrong CIDs, unreadable payload).
    tx_dropped,
    /// Guest packets answered with RST (bad type, op or length; unknown connection).
    tx_rejected,
    /// RX buffers returned empty because they were unusable (too small, bad address).
    rx_bad_buffers,
    /// RSTs not sent because the reset queue was full.
    rst_dropped,
    /// Connections reset because the guest ignored its credit.
    credit_violations,
    /// Host-initiated connections that reached the guest (CONNECT accepted).
    host_connections,
    /// Host clients dropped for a malformed CONNECT line, a timeout or the connection limit.
    host_connect_errors,
    /// Guest-initiated connections the host accepted.
    guest_connections,
    /// Guest-initiated connections refused (nothing listening at `<path>_<port>`).
    guest_connect_refused,
    /// Connections ended by a reset (either side, or an error).
    resets,
    /// Connections currently open.
    active_connections,
    /// Times the driver broke a queue (device then needs a reset).
    broken_queues,
    /// Transport reset events delivered to the guest.
    transport_resets,
    /// Interrupts sent to the guest.
    interrupts,
}

impl VsockMetrics {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Set a gauge.
    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }
}
