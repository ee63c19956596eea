//! How devices raise interrupts and receive doorbells without knowing about KVM.
//!
//! The VMM implements these traits over `irqfd`, `KVM_SET_GSI_ROUTING` and `ioeventfd`; tests
//! implement them with plain eventfds.

use vmm_sys_util::eventfd::EventFd;

/// Errors from interrupt and notification plumbing.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// No more GSIs are available for MSI routes.
    #[error("Out of interrupt routes (GSIs)")]
    NoFreeGsi,
    /// The hypervisor refused a routing or eventfd operation.
    #[error("Interrupt plumbing failed: {0}")]
    Hypervisor(String),
    /// The GSI is not one this router handed out.
    #[error("Unknown interrupt route {0}")]
    UnknownRoute(u32),
}

/// A level/edge line into the IOAPIC/PIC (legacy devices: serial, RTC, ACPI SCI).
/// Triggering is done by writing the eventfd, which KVM injects as an edge on `gsi`.
pub struct LegacyIrq {
    /// The GSI (== IOAPIC pin) this line drives.
    pub gsi: u32,
    /// Write 1 to raise the interrupt.
    pub event: EventFd,
}

/// One MSI/MSI-X vector's route: an eventfd bound (irqfd) to a GSI whose routing entry carries
/// the guest-programmed address/data.
pub struct MsiRoute {
    /// The GSI reserved for this vector.
    pub gsi: u32,
    /// Write 1 to deliver the message, once enabled and unmasked.
    pub event: EventFd,
}

/// Allocates and programs MSI routes (implemented by the VMM's GSI routing manager).
pub trait MsiRouter: Send + Sync {
    /// Reserve a GSI and an irqfd-bound eventfd for one vector. The route starts disabled.
    fn allocate(&self) -> Result<MsiRoute, InterruptError>;
    /// Program the vector's message. `enabled == false` (masked, or MSI-X disabled) removes the
    /// route so writes to the eventfd are not delivered.
    fn update(&self, gsi: u32, addr: u64, data: u32, enabled: bool) -> Result<(), InterruptError>;
    /// Release a GSI obtained from [`MsiRouter::allocate`].
    fn release(&self, route: MsiRoute) -> Result<(), InterruptError>;
}

/// Registers doorbells: a guest write of `datamatch` (or anything, if `None`) with the given
/// width at `addr` signals `event` without a VMM exit (implemented over KVM ioeventfd).
pub trait IoEventRegistrar: Send + Sync {
    /// Start signalling `event` on writes to MMIO `addr`.
    fn register_mmio(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), InterruptError>;
    /// Stop signalling `event` for `addr` (e.g. the guest moved the BAR).
    fn unregister_mmio(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), InterruptError>;
}
