//! PCI for Ferrite: one root bus (bus 0) with a host bridge and up to 31 devices, reached by
//! the guest through CF8/CFC port I/O or ECAM MMIO, with memory BARs mapped on the MMIO bus and
//! MSI-X interrupts.

#![warn(missing_docs)]

mod config_access;
pub mod configuration;
mod device;
pub mod msix;
mod root;

pub use config_access::{PciConfigIo, PciConfigMmio};
pub use configuration::{
    BarInfo, BarKind, PciConfigParams, PciConfiguration, PciConfigurationState, BAR0_REG,
    COMMAND_MEMORY, COMMAND_REG, NUM_BARS,
};
pub use device::{HostBridge, PciDevice, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};
pub use msix::{MsixConfig, MsixState, MsixTableEntry};
pub use root::{PciRoot, SharedPciDevice};

/// Errors of the PCI layer.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// BAR index out of range or already used.
    #[error("Invalid BAR index {0}")]
    InvalidBar(usize),
    /// BAR size not a power of two, or too small/large.
    #[error("Invalid BAR size {0:#x}")]
    InvalidBarSize(u64),
    /// BAR address not aligned to its size or out of its type's range.
    #[error("Invalid BAR address {0:#x}")]
    InvalidBarAddress(u64),
    /// A capability must have at least an ID and a next pointer.
    #[error("Capability too small")]
    CapabilityTooSmall,
    /// No room left in the 256-byte configuration space.
    #[error("No room for another capability")]
    CapabilitySpaceFull,
    /// MSI-X vector count must be 1..=2048.
    #[error("Invalid MSI-X vector count {0}")]
    InvalidMsixVectors(u16),
    /// All 31 device slots of bus 0 are taken.
    #[error("No free PCI slot")]
    NoFreeSlot,
    /// The BAR window has no room for this BAR.
    #[error("Out of PCI MMIO space for a {0:#x}-byte BAR")]
    OutOfMmioSpace(u64),
    /// Mapping a BAR on the MMIO bus failed.
    #[error("Cannot map BAR: {0}")]
    Bus(#[from] vm_device::BusError),
    /// Interrupt plumbing failed.
    #[error("Interrupt setup failed: {0}")]
    Interrupt(#[from] vm_device::InterruptError),
    /// A device-specific failure while handling a BAR move.
    #[error("Device failed to follow BAR move: {0}")]
    Device(String),
    /// A snapshot does not fit this device.
    #[error("Invalid PCI state: {0}")]
    InvalidState(&'static str),
}
