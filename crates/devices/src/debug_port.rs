//! Port 0x80, the POST-code / I/O-delay port: firmware and test guests write progress codes to
//! it; Linux writes it as an I/O delay. Claiming it keeps such writes out of the VMM's
//! "unhandled port" logs and makes the last code visible to the host.

use std::sync::Arc;

use vm_device::BusDevice;

use crate::counter::Counter;
use crate::error::DeviceError;

/// The POST-code port (not in `arch::layout::ports`, which lists the devices the ACPI tables
/// describe; this one needs no description).
pub const POST_CODE_PORT: u16 = 0x80;
/// Length of the bus range.
pub const POST_CODE_PORT_LEN: u64 = 1;

/// Counters of the POST-code port.
#[derive(Debug, Default, serde::Serialize)]
pub struct DebugPortMetrics {
    /// Codes written.
    pub writes: Counter,
}

/// Serialisable state: the last code written.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DebugPortState {
    /// Last POST code the guest wrote (reads return it).
    pub last_code: u8,
}

/// The POST-code port.
#[derive(Default)]
pub struct DebugPort {
    last_code: u8,
    metrics: Arc<DebugPortMetrics>,
}

impl DebugPort {
    /// A port that has seen no code yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last code the guest wrote.
    pub fn last_code(&self) -> u8 {
        self.last_code
    }

    /// The counters of this port.
    pub fn metrics(&self) -> Arc<DebugPortMetrics> {
        self.metrics.clone()
    }

    /// The guest-visible state, for snapshots.
    pub fn save(&self) -> DebugPortState {
        DebugPortState {
            last_code: self.last_code,
        }
    }

    /// Load a saved state (any byte is valid).
    pub fn restore(&mut self, state: &DebugPortState) -> Result<(), DeviceError> {
        self.last_code = state.last_code;
        Ok(())
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (0, Some(first)) = (offset, data.first_mut()) {
            *first = self.last_code;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&code)) = (offset, data.first()) {
            self.last_code = code;
            self.metrics.writes.inc();
            tracing::trace!("POST code {code:#04x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_debug_port_records_last_code() {
        let mut port = DebugPort::new();

        port.write(0, &[0x12]);
        port.write(0, &[0x34, 0x56]);
        let mut data = [0xffu8; 2];
        port.read(0, &mut data);

        assert_eq!(data, [0x34, 0]);
        assert_eq!(port.metrics().writes.get(), 2);
    }

    #[test]
    fn test_debug_port_odd_offsets_and_widths_do_not_panic() {
        let mut port = DebugPort::new();
        let mut data = [0xffu8; 4];

        port.write(u64::MAX, &[1]);
        port.write(0, &[]);
        port.read(5, &mut data);
        port.read(0, &mut []);

        assert_eq!(data, [0; 4]);
        assert_eq!(port.last_code(), 0);
    }

    #[test]
    fn test_debug_port_save_restore_round_trips() {
        let mut port = DebugPort::new();
        port.write(0, &[0xaa]);
        let json = serde_json::to_string(&port.save()).unwrap();
        let mut fresh = DebugPort::new();

        fresh
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();

        assert_eq!(fresh.last_code(), 0xaa);
    }
}
