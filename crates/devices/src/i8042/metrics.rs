//! i8042 counters.

use crate::counter::Counter;

/// Counters of the i8042, shared (`Arc`) between the device and the metrics reporter.
#[derive(Debug, Default, serde::Serialize)]
pub struct I8042Metrics {
    /// Reset requests (command 0xfe / output-port reset line pulled low).
    pub reset_requests: Counter,
    /// Controller commands the model does not implement (ignored).
    pub unknown_commands: Counter,
    /// Bytes dropped because the output queue was full.
    pub output_overflows: Counter,
    /// Accesses to ports the model does not decode (0x61..0x63, out of range).
    pub invalid_accesses: Counter,
}
