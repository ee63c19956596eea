//! What is printed when a VM fails: the reason, the vCPU's registers and the bytes at RIP.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// Everything known about a vCPU-level failure, formatted for stderr.
#[derive(Debug, Clone)]
pub struct FailureReport {
    /// vCPU index.
    pub vcpu: u32,
    /// Why the VM stopped.
    pub reason: String,
    /// General registers at the failure, if they could be read.
    pub regs: Option<kvm_regs>,
    /// Segment and control registers, if they could be read.
    pub sregs: Option<kvm_sregs>,
    /// Instruction bytes at RIP (from KVM or guest memory), possibly empty.
    pub insn: Vec<u8>,
}

fn seg(f: &mut fmt::Formatter<'_>, name: &str, s: &kvm_segment) -> fmt::Result {
    writeln!(
        f,
        "  {name}={:#06x} base={:#x} limit={:#x} type={:#x} dpl={} db={} l={} present={}",
        s.selector, s.base, s.limit, s.type_, s.dpl, s.db, s.l, s.present
    )
}

impl fmt::Display for FailureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "VM failed on vCPU {}: {}", self.vcpu, self.reason)?;
        if let Some(r) = &self.regs {
            writeln!(f, "  rip={:#018x} rflags={:#010x}", r.rip, r.rflags)?;
            // One row per line of the dump, in the order people read a register file.
            #[rustfmt::skip]
            let rows = [
                [("rax", r.rax), ("rbx", r.rbx), ("rcx", r.rcx), ("rdx", r.rdx)],
                [("rsi", r.rsi), ("rdi", r.rdi), ("rsp", r.rsp), ("rbp", r.rbp)],
                [("r8 ", r.r8), ("r9 ", r.r9), ("r10", r.r10), ("r11", r.r11)],
                [("r12", r.r12), ("r13", r.r13), ("r14", r.r14), ("r15", r.r15)],
            ];
            for row in rows {
                let cells: Vec<String> = row
                    .iter()
                    .map(|(name, value)| format!("{name}={value:#018x}"))
                    .collect();
                writeln!(f, "  {}", cells.join(" "))?;
            }
        } else {
            writeln!(f, "  (general registers unavailable)")?;
        }
        if let Some(s) = &self.sregs {
            writeln!(
                f,
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            )?;
            seg(f, "cs", &s.cs)?;
            seg(f, "ss", &s.ss)?;
        } else {
            writeln!(f, "  (system registers unavailable)")?;
        }
        if self.insn.is_empty() {
            write!(f, "  bytes at rip: (unreadable)")
        } else {
            let hex: Vec<String> = self.insn.iter().map(|b| format!("{b:02x}")).collect();
            write!(f, "  bytes at rip: {}", hex.join(" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_report_lists_registers_and_bytes() {
        let report = FailureReport {
            vcpu: 0,
            reason: "triple fault".into(),
            regs: Some(kvm_regs {
                rip: 0x1234,
                r15: 0xf,
                ..Default::default()
            }),
            sregs: Some(kvm_sregs {
                cr3: 0x9000,
                ..Default::default()
            }),
            insn: vec![0x0f, 0x0b],
        };
        let text = report.to_string();
        assert!(text.contains("triple fault"));
        assert!(text.contains("rip=0x0000000000001234"));
        assert!(text.contains("r15=0x000000000000000f"));
        assert!(text.contains("cr3=0x9000"));
        assert!(text.contains("cs=0x0000"));
        assert!(text.contains("bytes at rip: 0f 0b"));
    }
}
