//! Legacy platform devices of a Ferrite VM, all on the port-I/O bus.
//!
//! | device | module | ports (base, len) | IRQ (GSI) |
//! |---|---|---|---|
//! | i8042 keyboard controller (reset via 0xfe) | [`i8042`] | `0x60`, 5 (data at +0, command/status at +4) | 1 |
//! | CMOS/RTC | [`cmos`] | `0x70`, 2 | 8, optional ([`LegacyDevices::attach_rtc_irq`]) |
//! | COM1 16550A | [`serial`] | `0x3f8`, 8 | 4 |
//! | ACPI PM1a_EVT + PM1a_CNT + PM_TMR | [`acpi_pm`] | `0x600`, 12 | SCI 9 |
//! | ACPI reset register | [`acpi_pm`] | `0xcf9`, 1 (or forwarded by the PCI CF8 decoder) | none |
//! | POST-code port | [`debug_port`] | `0x80`, 1 | none |
//!
//! Every device implements [`vm_device::BusDevice`] (never panics on any offset or width), has a
//! serde state struct with `save()`/`restore()`, and an `Arc`'d metrics struct of counters.
//! [`LegacyDevices`] builds them all, inserts them at the layout's ports, and saves/restores
//! them as one [`LegacyDevicesState`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use arch::layout::irqs;
//! use devices::serial::{ConsoleWriter, DEFAULT_CONSOLE_BUFFER};
//! use devices::{LegacyDevices, LegacyIrqs};
//! use vm_device::{Bus, LegacyIrq, ShutdownSignal};
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The VMM binds each eventfd to its GSI with irqfd (vm.register_irqfd(&event, gsi)).
//! let irq = |gsi| -> std::io::Result<LegacyIrq> {
//!     Ok(LegacyIrq { gsi, event: EventFd::new(EFD_NONBLOCK)? })
//! };
//! let irqs = LegacyIrqs {
//!     keyboard: irq(irqs::KEYBOARD)?,
//!     com1: irq(irqs::COM1)?,
//!     acpi_sci: irq(irqs::ACPI_SCI)?,
//! };
//! let shutdown = ShutdownSignal::new()?;
//! let (console, console_handle) =
//!     ConsoleWriter::spawn(Box::new(std::io::stdout()), DEFAULT_CONSOLE_BUFFER)?;
//! let devices = LegacyDevices::new(512 << 20, Box::new(console), irqs, shutdown.clone())?;
//! devices.attach_rtc_irq(irq(irqs::RTC)?)?;
//! let pio = Bus::new();
//! // With PCI: insert pci::PciConfigIo at (0xcf8, 8), built
//! // .with_port_cf9(devices.acpi_reset.clone()), *before* this call.
//! devices.insert_into(&pio)?;
//!
//! // stdin thread: hand bytes to COM1, wait for room when the FIFO is full.
//! let serial = Arc::clone(&devices.serial);
//! let room = serial.lock().unwrap().input_space_event()?;
//! let mut pending: &[u8] = b"root\n";
//! while !pending.is_empty() {
//!     let taken = serial.lock().unwrap().enqueue_input(pending);
//!     pending = &pending[taken..];
//!     if taken == 0 {
//!         // Real code: epoll until `room` is readable (the guest drained the FIFO), then
//!         // read it to reset it. It is non-blocking, so this read returns WouldBlock early.
//!         let _ = room.read();
//!     }
//! }
//!
//! // Graceful stop: ask the guest to power off through ACPI.
//! let guest_listens = devices.acpi_pm.lock().unwrap().press_power_button();
//! # let _ = guest_listens;
//! // At exit: give queued console output a moment to reach stdout.
//! console_handle.flush_timeout(std::time::Duration::from_secs(1));
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod acpi_pm;
pub mod cmos;
pub mod counter;
pub mod debug_port;
pub mod error;
pub mod i8042;
pub mod irq;
mod legacy;
pub mod serial;

pub use acpi_pm::{AcpiPm, AcpiPmState, AcpiResetRegister, AcpiResetState};
pub use cmos::{Cmos, CmosMemory, CmosState};
pub use counter::Counter;
pub use debug_port::{DebugPort, DebugPortState};
pub use error::DeviceError;
pub use i8042::{I8042State, I8042};
pub use irq::IrqLine;
pub use legacy::{LegacyDevices, LegacyDevicesState, LegacyIrqs, LegacyMetrics};
pub use serial::{ConsoleHandle, ConsoleWriter, Serial, SerialState};
