//! The GSI routing manager: owns KVM's whole interrupt routing table (legacy IOAPIC/PIC pins
//! plus one MSI route per allocated vector) and rebuilds it on every change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vm_device::{InterruptError, LegacyIrq, MsiRoute, MsiRouter};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use arch::layout::irqs::{FIRST_MSI_GSI, IOAPIC_PINS};

/// Highest GSI handed out (KVM_MAX_IRQ_ROUTES is 4096 on x86).
const LAST_GSI: u32 = 4095;

#[derive(Default)]
struct RouterState {
    /// Allocated MSI GSIs and their message (None while disabled).
    msi: BTreeMap<u32, Option<(u64, u32)>>,
    /// Next never-used GSI.
    next_gsi: u32,
    /// Released GSIs available for reuse.
    free: Vec<u32>,
}

/// Implements [`MsiRouter`] over `KVM_SET_GSI_ROUTING` and irqfd, and hands out legacy lines.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        flags: 0,
        pad: 0,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
    }
}

fn msi_entry(gsi: u32, addr: u64, data: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        flags: 0,
        pad: 0,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: addr as u32,
                address_hi: (addr >> 32) as u32,
                data,
                ..Default::default()
            },
        },
    }
}

/// The legacy part of the table: GSI n → PIC pin n (n < 16, except the cascade pin 2) and
/// IOAPIC pin n, except GSI 0 (the PIT), which goes to IOAPIC pin 2 as the MADT's interrupt
/// source override says.
pub fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity(40);
    for gsi in 0..IOAPIC_PINS {
        if gsi == 2 {
            continue;
        }
        if gsi < 8 {
            routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        let pin = if gsi == 0 { 2 } else { gsi };
        routes.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, pin));
    }
    routes
}

impl GsiRouter {
    /// A router for `vm`; installs the legacy routes at once.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, InterruptError> {
        let router = Self {
            vm,
            state: Mutex::new(RouterState {
                next_gsi: FIRST_MSI_GSI,
                ..Default::default()
            }),
        };
        {
            let state = router.lock();
            router.commit(&state)?;
        }
        Ok(router)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, state: &RouterState) -> Result<(), InterruptError> {
        let mut entries = legacy_routes();
        for (gsi, msg) in &state.msi {
            if let Some((addr, data)) = msg {
                entries.push(msi_entry(*gsi, *addr, *data));
            }
        }
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| InterruptError::Hypervisor(format!("routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| InterruptError::Hypervisor(format!("KVM_SET_GSI_ROUTING: {e}")))
    }

    /// An irqfd-backed line into IOAPIC pin (and PIC pin) `gsi`, for legacy devices.
    pub fn legacy_irq(&self, gsi: u32) -> Result<LegacyIrq, InterruptError> {
        if gsi >= IOAPIC_PINS {
            return Err(InterruptError::UnknownRoute(gsi));
        }
        let event = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| InterruptError::Hypervisor(format!("eventfd: {e}")))?;
        self.vm
            .register_irqfd(&event, gsi)
            .map_err(|e| InterruptError::Hypervisor(format!("KVM_IRQFD: {e}")))?;
        Ok(LegacyIrq { gsi, event })
    }

    /// Number of MSI routes currently allocated.
    pub fn allocated(&self) -> usize {
        self.lock().msi.len()
    }
}

impl MsiRouter for GsiRouter {
    fn allocate(&self) -> Result<MsiRoute, InterruptError> {
        let mut state = self.lock();
        let gsi = match state.free.pop() {
            Some(gsi) => gsi,
            None if state.next_gsi <= LAST_GSI => {
                state.next_gsi += 1;
                state.next_gsi - 1
            }
            None => return Err(InterruptError::NoFreeGsi),
        };
        let event = match EventFd::new(EFD_NONBLOCK) {
            Ok(e) => e,
            Err(e) => {
                state.free.push(gsi);
                return Err(InterruptError::Hypervisor(format!("eventfd: {e}")));
            }
        };
        if let Err(e) = self.vm.register_irqfd(&event, gsi) {
            state.free.push(gsi);
            return Err(InterruptError::Hypervisor(format!("KVM_IRQFD: {e}")));
        }
        state.msi.insert(gsi, None);
        Ok(MsiRoute { gsi, event })
    }

    fn update(&self, gsi: u32, addr: u64, data: u32, enabled: bool) -> Result<(), InterruptError> {
        let mut state = self.lock();
        let slot = state
            .msi
            .get_mut(&gsi)
            .ok_or(InterruptError::UnknownRoute(gsi))?;
        let new = enabled.then_some((addr, data));
        if *slot == new {
            return Ok(());
        }
        *slot = new;
        self.commit(&state)
    }

    fn release(&self, route: MsiRoute) -> Result<(), InterruptError> {
        let mut state = self.lock();
        let Some(msg) = state.msi.remove(&route.gsi) else {
            return Err(InterruptError::UnknownRoute(route.gsi));
        };
        let unregistered = self.vm.unregister_irqfd(&route.event, route.gsi);
        state.free.push(route.gsi);
        if msg.is_some() {
            self.commit(&state)?;
        }
        unregistered.map_err(|e| InterruptError::Hypervisor(format!("KVM_IRQFD deassign: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::Hypervisor;

    #[test]
    fn test_legacy_routes_gsi0_goes_to_ioapic_pin2() {
        let routes = legacy_routes();
        let gsi0: Vec<_> = routes.iter().filter(|r| r.gsi == 0).collect();
        assert_eq!(gsi0.len(), 2);
        // SAFETY: irqchip entries carry the irqchip variant.
        let targets: Vec<_> = gsi0.iter().map(|r| unsafe { r.u.irqchip }).collect();
        assert!(targets
            .iter()
            .any(|t| t.irqchip == KVM_IRQCHIP_IOAPIC && t.pin == 2));
        assert!(targets
            .iter()
            .any(|t| t.irqchip == KVM_IRQCHIP_PIC_MASTER && t.pin == 0));
        assert!(routes.iter().all(|r| r.gsi != 2));
    }

    #[test]
    fn test_router_allocate_update_release_reuses_gsi() {
        let hv = Hypervisor::open().unwrap();
        let vm = hv.create_vm().unwrap();
        let router = GsiRouter::new(vm).unwrap();
        let a = router.allocate().unwrap();
        assert_eq!(a.gsi, FIRST_MSI_GSI);
        router.update(a.gsi, 0xfee0_0000, 0x4021, true).unwrap();
        router.update(a.gsi, 0xfee0_0000, 0x4021, false).unwrap();
        let gsi = a.gsi;
        router.release(a).unwrap();
        assert_eq!(router.allocated(), 0);
        let b = router.allocate().unwrap();
        assert_eq!(b.gsi, gsi);
    }

    #[test]
    fn test_router_update_unknown_gsi_is_error() {
        let hv = Hypervisor::open().unwrap();
        let router = GsiRouter::new(hv.create_vm().unwrap()).unwrap();
        assert!(matches!(
            router.update(999, 0, 0, true),
            Err(InterruptError::UnknownRoute(999))
        ));
    }
}
