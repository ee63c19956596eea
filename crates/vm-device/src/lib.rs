//! The contract between the VMM and its devices.
//!
//! Every emulated device is reached through a [`Bus`] (one for port I/O, one for MMIO) and
//! signals the guest through the interrupt traits in [`interrupt`]. Keeping these in a crate of
//! their own lets `devices`, `pci` and `virtio` be written and tested without the KVM plumbing in
//! `vmm`, which implements the traits.

pub mod bus;
pub mod interrupt;
pub mod shutdown;

pub use bus::{Bus, BusDevice, BusError, BusRange, SharedDevice};
pub use interrupt::{InterruptError, IoEventRegistrar, LegacyIrq, MsiRoute, MsiRouter};
pub use shutdown::{ShutdownKind, ShutdownSignal};

/// Guest memory as every Ferrite component sees it. The atomic bitmap records pages written by
/// the VMM itself (device DMA), which live migration and diff snapshots add to KVM's dirty log.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
