//! A breakpoint that a snapshot would lose on `kvm_pvm` hosts.
//!
//! `KVM_GET_VCPU_EVENTS` never reports a software exception (#BP from `int3`): KVM expects
//! RIP to still point at the instruction, so that the guest simply executes it again after a
//! restore, which holds on VT-x and SVM. `kvm_pvm` moves RIP past a CPL3 `int3` when it
//! queues the #BP (and Ferrite's repair hook does the same for a CPL0 `int3` it finishes), so
//! a vCPU stopped between that and the delivery holds a #BP that exists only inside KVM:
//! saved then, the guest resumes after the `int3` as if its handler had run and returned (a
//! service call that "returns" its own number, say). Measured on our hosts: 4 of 300
//! snapshots of the test guest's service-call-heavy `dirty` loop lost one.
//!
//! Nothing in KVM's API shows the queued #BP, so the vCPU loop looks at the one state it can
//! leave behind (RIP right after an `0xCC`, and #BP the last exception KVM queued) and
//! in that state runs the vCPU once more before it parks: KVM delivers the #BP on entry.
//! The same state also follows a handler that already returned; running once more then
//! costs only that run.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;
use vm_device::GuestMemoryMmap;

use super::{linear_rip, pagewalk, paging};

/// The `int3` opcode.
const INT3: u8 = 0xcc;
/// The #BP vector.
const VEC_BP: u8 = 3;

/// Whether the parked-to-be vCPU may hold a #BP that `KVM_GET_VCPU_EVENTS` would not show
/// (see the module comment). State that cannot be read counts as "no": the check only ever
/// adds a run, it never stops a pause.
pub fn may_hold_undelivered_breakpoint(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> bool {
    match (vcpu.get_vcpu_events(), vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(events), Ok(regs), Ok(sregs)) => after_breakpoint(&events, &regs, &sregs, mem),
        _ => false,
    }
}

/// The state a queued-but-undelivered #BP leaves: #BP was the last exception KVM queued and
/// the byte before RIP is an `int3`. Any privilege level: a CPL0 `int3` that the repair hook
/// finished (RIP + 1, #BP injected) is in the same state until the next entry.
fn after_breakpoint(
    events: &kvm_vcpu_events,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    mem: &GuestMemoryMmap,
) -> bool {
    if events.exception.nr != VEC_BP {
        return false;
    }
    let Some(before) = linear_rip(regs, sregs).checked_sub(1) else {
        return false;
    };
    let mut byte = [0u8; 1];
    pagewalk::read_virt(mem, &paging(sregs), before, &mut byte).is_ok() && byte[0] == INT3
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::repair::pagewalk::tests::long_mode_memory;

    /// A vCPU of a 64-bit guest at `rip` whose last exception was `vector`, with an `int3`
    /// at 0x10_0000 (identity mapped).
    fn state(rip: u64, vector: u8) -> (kvm_vcpu_events, kvm_regs, kvm_sregs, GuestMemoryMmap) {
        let (mem, pg) = long_mode_memory();
        mem.write_obj(INT3, GuestAddress(0x10_0000)).unwrap();
        let mut events = kvm_vcpu_events::default();
        events.exception.nr = vector;
        let regs = kvm_regs {
            rip,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr0: pg.cr0,
            cr3: pg.cr3,
            cr4: pg.cr4,
            efer: pg.efer,
            ..Default::default()
        };
        sregs.cs.l = 1;
        sregs.cs.selector = 0x33;
        (events, regs, sregs, mem)
    }

    #[test]
    fn test_right_after_an_int3_with_bp_last_may_hold_a_breakpoint() {
        let (events, regs, sregs, mem) = state(0x10_0001, VEC_BP);

        assert!(after_breakpoint(&events, &regs, &sregs, &mem));
    }

    #[test]
    fn test_other_instruction_or_vector_holds_none() {
        let cases = [
            state(0x10_0002, VEC_BP),      // the byte before RIP is not an int3
            state(0x10_0001, 14),          // the last exception was a page fault
            state(0, VEC_BP),              // RIP 0 has no byte before it
            state(0x7f_f000_0000, VEC_BP), // nothing mapped before RIP
        ];

        for (events, regs, sregs, mem) in &cases {
            assert!(
                !after_breakpoint(events, regs, sregs, mem),
                "rip {:#x}",
                regs.rip
            );
        }
    }
}
