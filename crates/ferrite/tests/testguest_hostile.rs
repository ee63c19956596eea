//! The test guest's `hostile` mode against every device type Ferrite has: garbage
//! notifications, bad descriptor addresses, loops and avail-index jumps at runtime. The VMM
//! must stay up, each device must break (DEVICE_NEEDS_RESET), answer or ignore each attack
//! and work again after a reset, and the VM must still power off cleanly.

mod common;
mod testguest_common;

use testguest_common::{num, GuestRun, ScratchDisk};

#[test]
fn test_hostile_guest_leaves_vmm_and_devices_working() {
    // Arrange
    let disk = ScratchDisk::zeroed("hostile", 4 << 20);
    let out = std::env::temp_dir().join(format!("ferrite-hostile-{}.txt", std::process::id()));
    let console = format!("file:{}", out.display());
    let extra = ["--rng", "--virtio-console", console.as_str()];
    let cmds = [
        "blk-write 0 0 64 9",
        "hostile",
        "blk-check 0 0 64 9",
        "rng 4096",
        "vcon-write still here",
        "poweroff",
    ];

    // Act
    let guest = GuestRun {
        disks: vec![disk.arg()],
        extra: &extra,
        ..GuestRun::new(&cmds)
    }
    .run();

    // Assert
    let _ = std::fs::remove_file(&out);
    guest.assert_powered_off();
    assert!(
        guest.lines().any(|l| l == "hostile: done"),
        "{}",
        guest.context()
    );
    let summary = guest.ok("hostile", 0);
    assert_eq!(num(summary, "devices"), 3, "{summary}");
    assert_eq!(num(summary, "reset_failed"), 0, "{summary}");
    assert_eq!(num(summary, "unrecovered"), 0, "{summary}");
    let devices = guest.details("hostile");
    assert_eq!(devices.len(), 3, "{}", guest.context());
    for d in &devices {
        assert_eq!(num(d, "recovered"), 1, "{d}");
        // Loops, bad indices and avail jumps must break every device's queue 0.
        assert!(num(d, "broken") >= 5, "{d}");
    }
    // After resets, the disk driver comes back and reads what was written before.
    guest.ok("blk-check", 0);
    guest.ok("rng", 0);
    guest.ok("vcon-write", 0);
}
