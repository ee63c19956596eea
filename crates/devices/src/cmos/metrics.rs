//! CMOS/RTC counters.

use crate::counter::Counter;

/// Counters of the CMOS/RTC, shared (`Arc`) between the device and the metrics reporter.
#[derive(Debug, Default, serde::Serialize)]
pub struct CmosMetrics {
    /// Times the guest set the clock.
    pub clock_sets: Counter,
    /// Clock writes ignored because the registers did not hold a valid date and time.
    pub invalid_clock_sets: Counter,
    /// RTC interrupts (IRQ 8) raised.
    pub interrupts: Counter,
    /// Times the guest enabled RTC interrupts while no IRQ line is attached.
    pub unsupported_interrupt_enables: Counter,
    /// Accesses outside the index and data ports.
    pub invalid_accesses: Counter,
}
