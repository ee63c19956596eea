//! Doorbells without VMM exits: [`IoEventRegistrar`] over KVM ioeventfd.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_device::{InterruptError, IoEventRegistrar};
use vmm_sys_util::eventfd::EventFd;

/// Registers MMIO ioeventfds on one VM.
pub struct KvmIoEvents {
    vm: Arc<VmFd>,
}

impl KvmIoEvents {
    /// A registrar for `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

fn err(op: &str, e: kvm_ioctls::Error) -> InterruptError {
    InterruptError::Hypervisor(format!("{op}: {e}"))
}

impl IoEventRegistrar for KvmIoEvents {
    fn register_mmio(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), InterruptError> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.vm.register_ioevent(event, &a, v),
            None => self.vm.register_ioevent(event, &a, NoDatamatch),
        }
        .map_err(|e| err("KVM_IOEVENTFD", e))
    }

    fn unregister_mmio(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), InterruptError> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.vm.unregister_ioevent(event, &a, v),
            None => self.vm.unregister_ioevent(event, &a, NoDatamatch),
        }
        .map_err(|e| err("KVM_IOEVENTFD deassign", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::Hypervisor;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn test_register_then_unregister_mmio_succeeds() {
        let hv = Hypervisor::open().unwrap();
        let io = KvmIoEvents::new(hv.create_vm().unwrap());
        let ev = EventFd::new(EFD_NONBLOCK).unwrap();
        io.register_mmio(&ev, 0xc000_0000, Some(0)).unwrap();
        io.register_mmio(&ev, 0xc000_1000, None).unwrap();
        io.unregister_mmio(&ev, 0xc000_0000, Some(0)).unwrap();
        io.unregister_mmio(&ev, 0xc000_1000, None).unwrap();
    }
}
