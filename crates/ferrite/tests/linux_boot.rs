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
    assert_early_platform, assert_late_platform_so_far, assert_no_crash,
    assert_virtio_functions_enumerated, budget, enumerated_pci_ids, is_terminal, print_profile,
    require, run_args, ScratchDisk, VIRTIO_BALLOON_PCI_ID, VIRTIO_BLK_PCI_ID,
    VIRTIO_CONSOLE_PCI_ID, VIRTIO_NET_PCI_ID, VIRTIO_RNG_PCI_ID, VIRTIO_VSOCK_PCI_ID,
};

/// `ferrite` exit status when the VM failed (see `ferrite run --help`).
const VM_FAILED: i32 = 1;

/// Boot `vmlinux` through its PVH entry with ACPI, PCI, 2 vCPUs, 512 MiB and one function of
/// every virtio device kind (blk, net on a Ferrite-created TAP in a private network
/// namespace, vsock, rng, balloon, console) for a fixed budget
/// (`FERRITE_LINUX_BUDGET_SECS`, default 480 s) and check every platform fact the kernel
/// printed by then, including that it enumerated each virtio function on PCI.
#[test]
fn test_linux_pvh_boot_within_budget_reports_ferrite_platform() {
    // Arrange
    let kernel = common::asset("vmlinux");
    let initrd = common::asset("initrd.img");
    let disk = ScratchDisk::new("linux-pvh", 64 << 20);
    let dir = std::env::temp_dir().join(format!("ferrite-linux-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vsock = format!("cid=3,socket={}", dir.join("vsock.sock").display());
    let hvc = format!("file:{}", dir.join("hvc0.txt").display());
    let mut extra = vec![
        "--vsock",
        &vsock,
        "--rng",
        "--balloon",
        "--virtio-console",
        &hvc,
    ];
    let mut expected = vec![
        VIRTIO_BLK_PCI_ID,
        VIRTIO_VSOCK_PCI_ID,
        VIRTIO_RNG_PCI_ID,
        VIRTIO_BALLOON_PCI_ID,
        VIRTIO_CONSOLE_PCI_ID,
    ];
    // `--net` alone makes Ferrite create (and remove) a TAP: only inside a namespace of our
    // own, never in the host's network.
    let netns = common::netns::Netns::enter();
    extra.push("--net");
    expected.push(VIRTIO_NET_PCI_ID);
    let args = run_args(&kernel, &initrd, disk.path(), &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let budget = budget("FERRITE_LINUX_BUDGET_SECS", 480);

    // Act
    let run = run_ferrite_until(&args, budget, is_terminal);
    print_profile("vmlinux (PVH)", &run);
    println!(
        "PCI functions Linux enumerated: {:?}",
        enumerated_pci_ids(&run)
    );
    drop(netns);
    let _ = std::fs::remove_dir_all(&dir);

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
    if !assert_virtio_functions_enumerated(&run, &expected) {
        println!(
            "the run stopped before PCI enumeration was complete: virtio functions not checked"
        );
    }
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

/// The enumeration check reads Linux's own lines (taken from a run of this kernel on Ferrite
/// with every device kind): it finds each function, checks only once the scan is over, and
/// fails when a function is missing. No guest is booted.
#[test]
fn test_virtio_enumeration_check_reads_the_kernel_pci_lines() {
    // Arrange
    let log = [
        "[  112.321656] pci 0000:00:00.0: [8086:0d57] type 00 class 0x060000",
        "[  112.979278] pci 0000:00:01.0: [1af4:1042] type 00 class 0x010000",
        "[  112.979999] pci 0000:00:01.0: BAR 0 [mem 0xc0000000-0xc0007fff 64bit]",
        "[  113.543278] pci 0000:00:02.0: [1af4:1041] type 00 class 0x020000",
        "[  114.113457] pci 0000:00:03.0: [1af4:1053] type 00 class 0xff0000",
        "[  114.625913] pci 0000:00:04.0: [1af4:1044] type 00 class 0xff0000",
        "[  115.213116] pci 0000:00:05.0: [1af4:1045] type 00 class 0xff0000",
        "[  115.775278] pci 0000:00:06.0: [1af4:1043] type 00 class 0x078000",
        "[  121.663278] PCI: Using ACPI for IRQ routing",
    ];
    let run = |lines: &[&str]| common::stream::StreamedRun {
        output: common::RunOutput {
            code: None,
            stdout: String::new(),
            stderr: String::new(),
            timed_out: true,
            elapsed: std::time::Duration::ZERO,
        },
        lines: lines
            .iter()
            .map(|t| common::stream::TimedLine {
                at: std::time::Duration::ZERO,
                text: t.to_string(),
            })
            .collect(),
        stop: StopReason::Budget,
    };
    let all = [
        VIRTIO_BLK_PCI_ID,
        VIRTIO_NET_PCI_ID,
        VIRTIO_VSOCK_PCI_ID,
        VIRTIO_RNG_PCI_ID,
        VIRTIO_BALLOON_PCI_ID,
        VIRTIO_CONSOLE_PCI_ID,
    ];

    // Act
    let complete = run(&log);
    let unfinished = run(&log[..8]);
    let without_net = run(&[log[0], log[1], log[8]]);
    let missing = std::panic::catch_unwind(|| {
        assert_virtio_functions_enumerated(&without_net, &[VIRTIO_NET_PCI_ID])
    });

    // Assert
    assert_eq!(enumerated_pci_ids(&complete).len(), 7);
    assert!(assert_virtio_functions_enumerated(&complete, &all));
    assert!(!assert_virtio_functions_enumerated(&unfinished, &all));
    assert!(missing.is_err(), "a missing function must fail the check");
}
