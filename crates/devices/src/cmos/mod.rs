//! The MC146818 CMOS RTC and its 128 bytes of CMOS memory at ports 0x70 (index) / 0x71 (data).
//!
//! The clock follows the host's wall clock (UTC) plus an offset the guest sets by writing the
//! time registers. The memory-size fields firmware and old kernels read are filled at
//! construction. Update-ended, alarm and periodic interrupts are raised on IRQ 8 once the VMM
//! attaches the line ([`Cmos::attach_irq`]); without it register C can only be polled.

mod calendar;
mod clock;
mod core;
mod device;
mod metrics;
mod state;

pub use calendar::DateTime;
pub use clock::{HostClock, WallClock};
pub use core::CMOS_SIZE;
pub use device::{Cmos, CmosMemory, CMOS_PORT_LEN};
pub use metrics::CmosMetrics;
pub use state::CmosState;
