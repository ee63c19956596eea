//! The KVM state of the VM itself: the in-kernel PICs and IOAPIC, the PIT and the kvmclock.
//!
//! Guest time across a restore: the guest TSC cannot be carried over on every host (on
//! `kvm_pvm` hosts `IA32_TSC` writes are ignored and the guest always sees the host TSC), so
//! continuity comes from kvmclock. `KVM_SET_CLOCK` sets the VM's kvmclock base so the clock
//! the guest reads continues from the saved value; the time the VM spent saved is not seen
//! by the guest (as after a pause; the guest's NTP/RTC catches up the wall clock), the same
//! choice Firecracker makes.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{ioctl, Result};

/// State of the VM-level in-kernel devices and clock, serialisable for a snapshot.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    /// The master 8259 PIC (`KVM_IRQCHIP_PIC_MASTER`).
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC (`KVM_IRQCHIP_PIC_SLAVE`).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (`KVM_IRQCHIP_IOAPIC`).
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT (`KVM_GET_PIT2`).
    pub pit: kvm_pit_state2,
    /// The kvmclock base (`KVM_GET_CLOCK`), as read at save time.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmKvmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `kvm_irqchip` holds a union and has no `Debug`.
        f.debug_struct("VmKvmState")
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

/// Save the irqchip, PIT and clock state of a VM whose vCPUs are all paused (outside
/// `KVM_RUN`). Requires the in-kernel irqchip and PIT that [`crate::vm`] creates.
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState> {
    Ok(VmKvmState {
        pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
    })
}

/// Load `state` into a fresh VM created like [`crate::vm`] does (irqchip and PIT), after its
/// vCPUs were restored and before any of them runs.
///
/// The clock goes last, as close as possible to the vCPUs starting, so the guest sees the
/// smallest jump. See [`clock_for_restore`] for the flags passed.
pub fn restore_vm(vm: &VmFd, state: &VmKvmState) -> Result<()> {
    set_irqchip(vm, KVM_IRQCHIP_PIC_MASTER, &state.pic_master)?;
    set_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave)?;
    set_irqchip(vm, KVM_IRQCHIP_IOAPIC, &state.ioapic)?;
    vm.set_pit2(&state.pit).map_err(ioctl("KVM_SET_PIT2"))?;
    vm.set_clock(&clock_for_restore(&state.clock))
        .map_err(ioctl("KVM_SET_CLOCK"))
}

/// The `KVM_SET_CLOCK` argument that makes guest kvmclock time continue from `saved`.
///
/// Only `clock` is passed; `flags` is 0. `KVM_CLOCK_TSC_STABLE` is output-only, kernels
/// before 5.16 reject any flag with `EINVAL`, and `KVM_CLOCK_REALTIME` (with `realtime`,
/// `host_tsc`) would advance the clock by the wall time spent saved — which a snapshot
/// restored later, or on another host, should not show the guest as a sudden jump.
pub fn clock_for_restore(saved: &kvm_clock_data) -> kvm_clock_data {
    kvm_clock_data {
        clock: saved.clock,
        ..Default::default()
    }
}

fn get_irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Set one chip; `chip_id` comes from which field the state was in, not from the saved bytes.
fn set_irqchip(vm: &VmFd, chip_id: u32, saved: &kvm_irqchip) -> Result<()> {
    let chip = kvm_irqchip { chip_id, ..*saved };
    vm.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE};

    #[test]
    fn test_persist_clock_for_restore_keeps_time_and_clears_flags() {
        let saved = kvm_clock_data {
            clock: 123_456_789,
            flags: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
            realtime: 42,
            host_tsc: 99,
            ..Default::default()
        };

        let arg = clock_for_restore(&saved);

        assert_eq!(arg.clock, 123_456_789);
        assert_eq!(arg.flags, 0);
        assert_eq!((arg.realtime, arg.host_tsc), (0, 0));
    }
}
