//! ACPI PM counters.

use crate::counter::Counter;

/// Counters of the PM1a blocks and timer.
#[derive(Debug, Default, serde::Serialize)]
pub struct AcpiPmMetrics {
    /// SLP_EN writes with SLP_TYP = S5: power-off requests.
    pub power_off_requests: Counter,
    /// SLP_EN writes with another sleep type (ignored: not supported).
    pub unsupported_sleep_requests: Counter,
    /// Power button presses injected by the host.
    pub power_button_presses: Counter,
    /// SCIs raised.
    pub sci_raised: Counter,
    /// Accesses to bytes the block does not decode.
    pub invalid_accesses: Counter,
}

/// Counters of the reset register.
#[derive(Debug, Default, serde::Serialize)]
pub struct AcpiResetMetrics {
    /// Writes of the reset value: reset requests.
    pub reset_requests: Counter,
    /// Writes of any other value (ignored).
    pub ignored_writes: Counter,
}
