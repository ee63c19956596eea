//! The test guest's virtio-rng driver against Ferrite's virtio-rng (host getrandom): bytes
//! differ between reads and between VMs, and a rate limit slows reads down.

mod common;
mod testguest_common;

use testguest_common::{num, value, Guest, GuestRun};

/// Boot the guest with `--rng[=opts]`, run `cmds`, and check it powered off.
fn run_with_rng(rng_flag: &str, cmds: &[&str]) -> Guest {
    let extra = [rng_flag];
    let guest = GuestRun {
        extra: &extra,
        ..GuestRun::new(cmds)
    }
    .run();
    guest.assert_powered_off();
    guest
}

#[test]
fn test_rng_two_reads_in_one_vm_differ() {
    // Arrange
    let cmds = ["rng 256", "rng 256", "poweroff"];

    // Act
    let guest = run_with_rng("--rng", &cmds);

    // Assert
    let a = guest.ok("rng", 0);
    let b = guest.ok("rng", 1);
    assert_eq!(num(a, "bytes"), 256, "{a}");
    assert_ne!(value(a, "fnv1a64"), value(b, "fnv1a64"), "{a}\n{b}");
    assert_ne!(value(a, "first"), value(b, "first"), "{a}\n{b}");
    // 256 random bytes hit ~160 distinct values; a constant or counter source would not.
    assert!(num(a, "distinct") > 64, "{a}");
}

#[test]
fn test_rng_reads_differ_between_vms() {
    // Arrange
    let cmds = ["rng 4096", "poweroff"];

    // Act
    let first = run_with_rng("--rng", &cmds);
    let second = run_with_rng("--rng", &cmds);

    // Assert
    let a = first.ok("rng", 0);
    let b = second.ok("rng", 0);
    assert_ne!(value(a, "fnv1a64"), value(b, "fnv1a64"), "{a}\n{b}");
    assert_eq!(num(a, "distinct"), 256, "{a}");
}

#[test]
fn test_rng_large_read_is_served_in_many_requests() {
    // Arrange
    let cmds = ["rng 1000000", "poweroff"];

    // Act
    let guest = run_with_rng("--rng", &cmds);

    // Assert
    let line = guest.ok("rng", 0);
    assert_eq!(num(line, "bytes"), 1_000_000, "{line}");
    assert!(num(line, "requests") >= 1_000_000 / 4096, "{line}");
}

#[test]
fn test_rng_without_device_reports_no_device() {
    // Arrange
    let cmds = ["rng 64", "poweroff"];

    // Act
    let guest = GuestRun::new(&cmds).run();

    // Assert
    guest.assert_powered_off();
    assert_eq!(guest.err("rng", 0), "ERR rng no-device");
}

#[test]
fn test_rng_bad_option_is_refused_before_boot() {
    // Arrange
    let cmds = ["poweroff"];
    let extra = ["--rng=speed=9"];

    // Act
    let guest = GuestRun {
        extra: &extra,
        ..GuestRun::new(&cmds)
    }
    .run();

    // Assert
    assert_eq!(guest.out.code, Some(2), "{}", guest.context());
    assert!(guest.out.stderr.contains("--rng"), "{}", guest.context());
}
