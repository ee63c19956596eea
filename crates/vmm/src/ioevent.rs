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

impl KvmIoEvents {
    /// Assign (`assign`) or deassign the ioeventfd `event` at MMIO `addr`.
    fn update(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
        assign: bool,
    ) -> Result<(), InterruptError> {
        let a = IoEventAddress::Mmio(addr);
        let vm = &self.vm;
        match (datamatch, assign) {
            (Some(v), true) => vm.register_ioevent(event, &a, v),
            (None, true) => vm.register_ioevent(event, &a, NoDatamatch),
            (Some(v), false) => vm.unregister_ioevent(event, &a, v),
            (None, false) => vm.unregister_ioevent(event, &a, NoDatamatch),
        }
        .map_err(|e| {
            let op = if assign {
                "KVM_IOEVENTFD"
            } else {
                "KVM_IOEVENTFD deassign"
            };
            InterruptError::Hypervisor(format!("{op}: {e}"))
        })
    }
}

impl IoEventRegistrar for KvmIoEvents {
    fn register_mmio(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), InterruptError> {
        self.update(event, addr, datamatch, true)
    }

    fn unregister_mmio(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), InterruptError> {
        self.update(event, addr, datamatch, false)
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
