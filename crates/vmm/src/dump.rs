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
            writeln!(
                f,
                "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
                r.rax, r.rbx, r.rcx, r.rdx
            )?;
            writeln!(
                f,
                "  rsi={:#018x} rdi={:#018x} rsp={:#018x} rbp={:#018x}",
                r.rsi, r.rdi, r.rsp, r.rbp
            )?;
            writeln!(
                f,
                "  r8 ={:#018x} r9 ={:#018x} r10={:#018x} r11={:#018x}",
                r.r8, r.r9, r.r10, r.r11
            )?;
            writeln!(
                f,
                "  r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}",
                r.r12, r.r13, r.r14, r.r15
            )?;
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
