//! Serialisable ACPI PM state.

use serde::{Deserialize, Serialize};

/// The PM1a registers and the PM timer's value at save time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// PM1_STS (pending events).
    pub pm1_sts: u16,
    /// PM1_EN (enabled events).
    pub pm1_en: u16,
    /// PM1_CNT (stored bits; SCI_EN is always read as set).
    pub pm1_cnt: u16,
    /// PM timer count when saved; a restored timer continues from it.
    pub pm_timer: u32,
    /// GPE0_STS (pending general-purpose events; 0 in snapshots older than the GPE block).
    #[serde(default)]
    pub gpe0_sts: u8,
    /// GPE0_EN (enabled general-purpose events).
    #[serde(default)]
    pub gpe0_en: u8,
}

/// The reset register's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiResetState {
    /// Last value the guest wrote (read back by the guest).
    pub value: u8,
}
