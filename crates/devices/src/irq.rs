//! Raising a legacy interrupt line from a device model.

use std::sync::Arc;

use vm_device::LegacyIrq;

use crate::counter::Counter;

/// A device's handle on its [`LegacyIrq`]: raising it writes the eventfd that KVM's irqfd injects
/// on the GSI. Cheap to clone (vm-superio needs to own its trigger).
#[derive(Clone)]
pub struct IrqLine {
    irq: Arc<LegacyIrq>,
    failures: Arc<Counter>,
}

impl IrqLine {
    /// Wrap the line the VMM registered with irqfd.
    pub fn new(irq: LegacyIrq) -> Self {
        Self {
            irq: Arc::new(irq),
            failures: Arc::new(Counter::default()),
        }
    }

    /// The GSI this line drives.
    pub fn gsi(&self) -> u32 {
        self.irq.gsi
    }

    /// Raise the interrupt. An eventfd write only fails when its counter would overflow, which
    /// means an interrupt is already pending: the failure is counted, not propagated.
    pub fn trigger(&self) {
        if let Err(e) = self.irq.event.write(1) {
            self.failures.inc();
            tracing::debug!(gsi = self.irq.gsi, "Interrupt eventfd write failed: {e}");
        }
    }

    /// How many triggers failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.get()
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        IrqLine::trigger(self);
        Ok(())
    }
}
