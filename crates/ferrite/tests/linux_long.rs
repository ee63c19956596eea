//! The long Linux runs (tens of minutes here, under emulation): the PVH boot all the way to
//! `/init`, and the bzImage boot path. Built only with `--features linux-tests`; run alone
//! with `scripts/test.sh --linux-long`.

mod common;
mod linux_common;

use common::stream::{run_ferrite_until, StopReason};
use linux_common::{
    assert_early_platform, assert_late_platform_so_far, assert_no_crash, budget, is_terminal,
    print_profile, require, run_args, ScratchDisk, VIRTIO_BLK_PCI_ID,
};

/// Boot `vmlinux` (PVH) until the kernel runs `/init` (`FERRITE_LINUX_LONG_BUDGET_SECS`,
/// default 1500 s): the whole platform is checked, including the virtio-blk PCI function.
#[test]
fn test_linux_pvh_full_boot_reaches_init_with_virtio_pci() {
    // Arrange
    let kernel = common::asset("vmlinux");
    let initrd = common::asset("initrd.img");
    let disk = ScratchDisk::new("linux-full", 64 << 20);
    let args = run_args(&kernel, &initrd, disk.path(), &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let budget = budget("FERRITE_LINUX_LONG_BUDGET_SECS", 1500);

    // Act
    let run = run_ferrite_until(&args, budget, is_terminal);
    print_profile("vmlinux (PVH), full boot", &run);

    // Assert
    assert_no_crash(&run);
    assert_early_platform(&run);
    assert_late_platform_so_far(&run);
    require(&run, "smp: Brought up");
    require(&run, "PCI: MMCONFIG for domain");
    require(&run, VIRTIO_BLK_PCI_ID);
    require(&run, "Trying to unpack rootfs");
    require(&run, "Run /init as init process");
}

/// Boot the compressed `vmlinuz` through the 64-bit bzImage entry: the kernel decompresses
/// itself (minutes here) and then reports the same platform as the PVH boot. Stops once the
/// early platform lines are out (`FERRITE_LINUX_BZIMAGE_BUDGET_SECS`, default 900 s).
#[test]
fn test_linux_bzimage_boot_reports_ferrite_platform() {
    // Arrange
    let kernel = common::asset("vmlinuz");
    let initrd = common::asset("initrd.img");
    let disk = ScratchDisk::new("linux-bzimage", 64 << 20);
    let args = run_args(&kernel, &initrd, disk.path(), &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let budget = budget("FERRITE_LINUX_BZIMAGE_BUDGET_SECS", 900);

    // Act: "Memory:" is the last of the early platform lines.
    let run = run_ferrite_until(&args, budget, |line| {
        line.contains("Memory: ") || is_terminal(line)
    });
    print_profile("vmlinuz (bzImage)", &run);

    // Assert
    assert_no_crash(&run);
    assert!(
        matches!(run.stop, StopReason::LineSeen(_)),
        "the bzImage boot did not get to the memory line (stopped: {:?})\n--- console tail ---\n{}\n--- ferrite stderr ---\n{}",
        run.stop,
        run.tail(40),
        run.output.stderr
    );
    assert_early_platform(&run);
}
