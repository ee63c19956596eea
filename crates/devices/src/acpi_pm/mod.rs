//! ACPI fixed hardware: the PM1a event and control blocks, the PM timer, the GPE0 block and the
//! reset register, as described by the FADT.
//!
//! Two bus devices: [`AcpiPm`] covers PM1a_EVT, PM1a_CNT, PM_TMR and GPE0 (contiguous in the
//! layout), [`AcpiResetRegister`] covers the one-byte FADT RESET_REG.

mod metrics;
mod pm_block;
mod pm_timer;
mod reset;
mod state;

pub use metrics::{AcpiPmMetrics, AcpiResetMetrics};
pub use pm_block::{AcpiPm, ACPI_PM_BLOCK_LEN};
pub use pm_timer::PM_TIMER_HZ;
pub use reset::{AcpiResetRegister, ACPI_RESET_LEN};
pub use state::{AcpiPmState, AcpiResetState};
