//! The FADT RESET_REG: a one-byte I/O register; writing the reset value restarts the machine.

use std::sync::Arc;

use vm_device::{BusDevice, ShutdownKind, ShutdownSignal};

use super::metrics::AcpiResetMetrics;
use super::state::AcpiResetState;
use crate::error::DeviceError;

/// Length of the bus range (one byte at `ports::ACPI_RESET`).
pub const ACPI_RESET_LEN: u64 = 1;

/// The reset register (0xcf9 in the layout, like the PIIX/ICH "reset control register").
pub struct AcpiResetRegister {
    value: u8,
    shutdown: ShutdownSignal,
    metrics: Arc<AcpiResetMetrics>,
}

impl AcpiResetRegister {
    /// A register that requests `ShutdownKind::Reset` on `shutdown` when the guest writes
    /// `arch::layout::ACPI_RESET_VALUE`.
    pub fn new(shutdown: ShutdownSignal) -> Self {
        Self {
            value: 0,
            shutdown,
            metrics: Arc::new(AcpiResetMetrics::default()),
        }
    }

    /// The counters of this register.
    pub fn metrics(&self) -> Arc<AcpiResetMetrics> {
        self.metrics.clone()
    }

    /// The guest-visible state, for snapshots.
    pub fn save(&self) -> AcpiResetState {
        AcpiResetState { value: self.value }
    }

    /// Load a saved state (any byte is valid).
    pub fn restore(&mut self, state: &AcpiResetState) -> Result<(), DeviceError> {
        self.value = state.value;
        Ok(())
    }
}

impl BusDevice for AcpiResetRegister {
    /// Reads return the last value written in the low byte, 0 elsewhere.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = self.value;
            }
        }
    }

    /// Only a write whose first byte lands on the register counts.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            self.metrics.ignored_writes.inc();
            return;
        };
        self.value = value;
        if value == arch::layout::ACPI_RESET_VALUE {
            self.metrics.reset_requests.inc();
            tracing::info!("ACPI: guest wrote the reset register");
            self.shutdown.request(ShutdownKind::Reset);
        } else {
            self.metrics.ignored_writes.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiResetRegister, ShutdownSignal) {
        let shutdown = ShutdownSignal::new().unwrap();
        (AcpiResetRegister::new(shutdown.clone()), shutdown)
    }

    #[test]
    fn test_acpi_reset_value_requests_reset() {
        let (mut dev, shutdown) = device();

        dev.write(0, &[arch::layout::ACPI_RESET_VALUE]);

        assert_eq!(shutdown.requested(), Some(ShutdownKind::Reset));
        assert_eq!(dev.metrics().reset_requests.get(), 1);
    }

    #[test]
    fn test_acpi_reset_other_value_is_ignored() {
        let (mut dev, shutdown) = device();

        dev.write(0, &[0x02]);

        assert_eq!(shutdown.requested(), None);
        let mut data = [0u8; 1];
        dev.read(0, &mut data);
        assert_eq!(data[0], 0x02);
    }

    #[test]
    fn test_acpi_reset_odd_offsets_and_widths_do_not_panic() {
        let (mut dev, shutdown) = device();
        let mut wide = [0xffu8; 8];

        dev.write(3, &[arch::layout::ACPI_RESET_VALUE]);
        dev.write(0, &[]);
        dev.read(u64::MAX, &mut wide);
        dev.read(0, &mut []);

        assert_eq!(wide, [0u8; 8]);
        assert_eq!(shutdown.requested(), None);
    }

    #[test]
    fn test_acpi_reset_save_restore_round_trips() {
        let (mut dev, _) = device();
        dev.write(0, &[0x04]);
        let json = serde_json::to_string(&dev.save()).unwrap();
        let (mut fresh, _) = device();

        fresh
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();

        assert_eq!(fresh.save(), AcpiResetState { value: 0x04 });
    }
}
