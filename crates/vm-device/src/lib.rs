//! The contract between the VMM and its devices.
//!
//! Every emulated device is reached through a [`Bus`] (one for port I/O, one for MMIO) and
//! signals the guest through the interrupt traits in [`interrupt`]. Keeping these in a crate of
//! their own lets `devices`, `pci` and `virtio` be written and tested without the KVM plumbing in
//! `vmm`, which implements the traits.

pub mod bus;
pub mod interrupt;

pub use bus::{Bus, BusDevice, BusError, BusRange};
pub use interrupt::{InterruptError, IoEventRegistrar, LegacyIrq, MsiRoute, MsiRouter};
