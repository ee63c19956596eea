//! Serialisable CMOS/RTC state.

use serde::{Deserialize, Serialize};

/// The CMOS memory and the guest's clock offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The selected register (0..128).
    pub index: u8,
    /// All 128 bytes of CMOS memory. The live time registers are computed from the clock on
    /// read; they are stored here only while the guest holds the SET bit.
    pub data: Vec<u8>,
    /// Guest time minus host wall-clock time, in nanoseconds.
    pub clock_offset_ns: i64,
}
