//! The KVM VM: capability checks, in-kernel interrupt controllers and the PIT.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

/// KVM API version every supported kernel reports.
const KVM_API_VERSION: i32 = 12;
/// Three pages for the VMX real-mode TSS, just below the BIOS area at the top of 4 GiB.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// One page for the VMX real-mode identity map, right below the TSS.
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Capabilities Ferrite cannot run without, with the name printed when one is missing.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
];

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("Cannot open /dev/kvm (load the kvm module and check permissions)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// Unexpected `KVM_GET_API_VERSION`.
    #[error("Unsupported KVM API version {0} (need {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A required capability is missing.
    #[error("Host KVM lacks {0}, which Ferrite needs")]
    MissingCap(&'static str),
    /// A VM-level ioctl failed.
    #[error("KVM {op} failed")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { op, source }
}

/// An open KVM system handle with its capabilities checked.
pub struct Hypervisor {
    /// `/dev/kvm`.
    pub kvm: Kvm,
}

impl Hypervisor {
    /// Open `/dev/kvm` and check the API version and every capability Ferrite needs.
    pub fn open() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        Ok(Self { kvm })
    }

    /// The most vCPUs one VM may have on this host (`KVM_CAP_MAX_VCPUS`).
    pub fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus() as u32
    }

    /// Whether this host's KVM emulates guest kernel code and needs instruction repair
    /// (the `kvm_pvm` module).
    pub fn needs_repair() -> bool {
        std::path::Path::new("/sys/module/kvm_pvm").exists()
    }

    /// Create a VM with its in-kernel IOAPIC/PIC/LAPICs and PIT.
    pub fn create_vm(&self) -> Result<Arc<VmFd>, VmError> {
        self.create_vm_with(|_| Ok(()))
    }

    /// Create a VM, let `register_memory` add its memory slots, then create the in-kernel
    /// IOAPIC/PIC/LAPICs and PIT.
    pub fn create_vm_with<E: From<VmError>>(
        &self,
        register_memory: impl FnOnce(&VmFd) -> Result<(), E>,
    ) -> Result<Arc<VmFd>, E> {
        let vm = self.create_vm_without_pit(register_memory)?;
        create_pit(&vm)?;
        Ok(vm)
    }

    /// [`Hypervisor::create_vm_with`] without the PIT, for a caller that creates it with
    /// [`PitCreation`] while it does other work.
    ///
    /// Memory goes in before the irqchip because a slot added after `KVM_CREATE_IRQCHIP`
    /// costs a fixed ~6–10 ms on `kvm_pvm` hosts (measured: 512 MiB slot 0.3 ms before the
    /// irqchip, 6.3 ms after), which was most of Ferrite's start-up time.
    pub fn create_vm_without_pit<E: From<VmError>>(
        &self,
        register_memory: impl FnOnce(&VmFd) -> Result<(), E>,
    ) -> Result<Arc<VmFd>, E> {
        let vm = self.kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        register_memory(&vm)?;
        vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        Ok(Arc::new(vm))
    }
}

/// Create the in-kernel PIT (i8254) of `vm`, whose irqchip exists.
pub fn create_pit(vm: &VmFd) -> Result<(), VmError> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))
}

/// `KVM_CREATE_PIT2` running on a thread of its own. It is the slowest ioctl of a VM's
/// creation (the kernel starts a worker thread for the PIT: ~1.6 ms of a ~5 ms restore here)
/// and nothing but the PIT's own state needs it, so it overlaps with device set-up.
/// Start it after the vCPUs exist (both take the VM's lock) and finish it before the PIT
/// state is restored or a vCPU runs.
pub struct PitCreation(std::thread::JoinHandle<Result<(), VmError>>);

impl PitCreation {
    /// Start creating `vm`'s PIT.
    pub fn start(vm: Arc<VmFd>) -> std::io::Result<Self> {
        std::thread::Builder::new()
            .name("pit-create".into())
            .spawn(move || create_pit(&vm))
            .map(PitCreation)
    }

    /// Wait for the PIT to exist.
    pub fn finish(self) -> Result<(), VmError> {
        self.0.join().unwrap_or_else(|_| {
            Err(VmError::Ioctl {
                op: "KVM_CREATE_PIT2",
                source: kvm_ioctls::Error::new(libc::EIO),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER};

    fn has_irqchip(vm: &VmFd) -> bool {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).is_ok()
    }

    #[test]
    fn test_create_vm_with_memory_registered_before_irqchip() {
        let hv = Hypervisor::open().unwrap();
        let mut irqchip_during_registration = None;

        let vm = hv
            .create_vm_with(|vm| {
                irqchip_during_registration = Some(has_irqchip(vm));
                Ok::<(), VmError>(())
            })
            .unwrap();

        assert_eq!(irqchip_during_registration, Some(false));
        assert!(has_irqchip(&vm));
    }

    #[test]
    fn test_create_vm_with_registration_error_is_returned() {
        let hv = Hypervisor::open().unwrap();

        let result = hv.create_vm_with(|_| Err(VmError::MissingCap("TEST")));

        assert!(matches!(result, Err(VmError::MissingCap("TEST"))));
    }
}
