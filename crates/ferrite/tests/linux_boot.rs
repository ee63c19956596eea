//! The Debian cloud kernel boots on Ferrite and reports Ferrite's platform back: the CI set.
//!
//! On our machines Linux runs only under emulation (minutes per boot), so each test runs
//! alone (`scripts/test.sh` uses `--test-threads=1`), is bounded by a budget and then asserts
//! on what the kernel printed by then. Built only with `--features linux-tests`.
//! The longer runs (full boot, bzImage) are in `linux_long.rs`.

mod common;
mod linux_common;

use common::stream::{run_ferrite_until, StopReason};
use linux_common::{
    assert_early_platform, assert_late_platform_so_far, assert_no_crash, budget, is_terminal,
    print_profile, require, run_args, ScratchDisk,
};

/// `ferrite` exit status when the VM failed (see `ferrite run --help`).
const VM_FAILED: i32 = 1;

/// Boot `vmlinux` through its PVH entry with ACPI, PCI, 2 vCPUs, 512 MiB and a virtio-blk
/// disk for a fixed budget (`FERRITE_LINUX_BUDGET_SECS`, default 420 s) and check every
/// platform fact the kernel printed by then.
#[test]
fn test_linux_pvh_boot_within_budget_reports_ferrite_platform() {
    // Arrange
    let kernel = common::asset("vmlinux");
    let initrd = common::asset("initrd.img");
    let disk = ScratchDisk::new("linux-pvh", 64 << 20);
    let args = run_args(&kernel, &initrd, disk.path(), &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let budget = budget("FERRITE_LINUX_BUDGET_SECS", 420);

    // Act
    let run = run_ferrite_until(&args, budget, is_terminal);
    print_profile("vmlinux (PVH)", &run);

    // Assert
    assert_no_crash(&run);
    if run.stop == StopReason::Exited {
        panic!(
            "ferrite exited (code {:?}) after {:.1}s before the budget or /init\n--- console tail ---\n{}\n--- ferrite stderr ---\n{}",
            run.output.code,
            run.output.elapsed.as_secs_f64(),
            run.tail(40),
            run.output.stderr
        );
    }
    assert_early_platform(&run);
    assert_late_platform_so_far(&run);
}

/// With the emulation-failure repair off, the kernel's int3 self-test (CPL0 `int3`, which
/// this KVM cannot emulate) must make Ferrite stop with a clear error naming the exit and the
/// instruction bytes, instead of hanging (`FERRITE_LINUX_ABORT_BUDGET_SECS`, default 300 s).
#[test]
fn test_linux_boot_without_repair_reports_emulation_failure() {
    // Arrange
    let kernel = common::asset("vmlinux");
    let initrd = common::asset("initrd.img");
    let disk = ScratchDisk::new("linux-abort", 64 << 20);
    let args = run_args(
        &kernel,
        &initrd,
        disk.path(),
        &["--repair-emulation", "off"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let budget = budget("FERRITE_LINUX_ABORT_BUDGET_SECS", 300);

    // Act
    let run = run_ferrite_until(&args, budget, |_| false);
    print_profile("vmlinux (PVH), repair off", &run);

    println!("ferrite stderr:\n{}", run.output.stderr);

    // Assert
    require(&run, "Linux version");
    assert_eq!(
        run.stop,
        StopReason::Exited,
        "ferrite did not stop by itself within {budget:?}\n--- console tail ---\n{}\n--- ferrite stderr ---\n{}",
        run.tail(20),
        run.output.stderr
    );
    assert_eq!(
        run.output.code,
        Some(VM_FAILED),
        "ferrite must exit with status {VM_FAILED} (the VM failed)\n--- ferrite stderr ---\n{}",
        run.output.stderr
    );
    let stderr = &run.output.stderr;
    assert!(
        stderr.contains("emulation failure"),
        "ferrite's error does not name the emulation failure:\n{stderr}"
    );
    let bytes = stderr
        .lines()
        .find_map(|line| line.split("bytes at rip:").nth(1))
        .unwrap_or_else(|| panic!("ferrite's error shows no instruction bytes:\n{stderr}"));
    assert_eq!(
        bytes.split_whitespace().next(),
        Some("cc"),
        "the failing instruction is not the self-test's int3 (0xcc):\n{stderr}"
    );
}
