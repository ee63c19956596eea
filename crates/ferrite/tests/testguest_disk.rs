//! The test guest's virtio-blk driver against Ferrite's virtio-blk device: data written on
//! one side is found on the other (host file checked byte for byte), read-only disks refuse
//! writes, flush/write-zeroes/GET_ID work and MSI-X interrupts arrive.

mod common;
mod testguest_common;

use testguest_common::{fnv_hex, num, pattern_bytes, value, Guest, GuestRun, ScratchDisk};

const DISK_BYTES: u64 = 4 << 20;
const SECTORS: u64 = DISK_BYTES / 512;

/// Boot the test guest with `disk` as its only disk, run `cmds`, and check it powered off.
fn run_with_disk(disk: &ScratchDisk, cmds: &[&str]) -> Guest {
    let run = GuestRun {
        disks: vec![disk.arg()],
        ..GuestRun::new(cmds)
    };
    let guest = run.run();
    guest.assert_powered_off();
    guest
}

#[test]
fn test_testguest_guest_written_pattern_lands_in_host_file() {
    // Arrange
    let disk = ScratchDisk::zeroed("guest-write", DISK_BYTES);
    let cmds = ["blk", "blk-write 0 100 300 7", "blk-flush 0", "poweroff"];
    // Act
    let guest = run_with_disk(&disk, &cmds);

    // Assert
    let blk = guest.details("blk");
    assert_eq!(blk.len(), 1, "{}", guest.context());
    assert_eq!(num(blk[0], "capacity"), SECTORS, "{}", blk[0]);
    assert_eq!(num(blk[0], "ro"), 0, "{}", blk[0]);
    guest.ok("blk-write", 0);
    guest.ok("blk-flush", 0);
    let bytes = disk.read();
    assert_eq!(bytes.len() as u64, DISK_BYTES);
    assert!(
        bytes[..100 * 512].iter().all(|&b| b == 0),
        "bytes before the range changed"
    );
    assert!(
        bytes[100 * 512..400 * 512] == pattern_bytes(7, 100, 300)[..],
        "host file lacks the guest's pattern"
    );
    assert!(
        bytes[400 * 512..].iter().all(|&b| b == 0),
        "bytes after the range changed"
    );
}

#[test]
fn test_testguest_host_written_pattern_verified_by_guest() {
    // Arrange
    let disk = ScratchDisk::with_pattern("host-write", DISK_BYTES, 99);
    let host_hash = fnv_hex(&disk.read());
    let cmds = [
        "blk-check 0 0 8192 99",
        "blk-check 0 0 16 98",
        &format!("blk-sum 0 0 {SECTORS}"),
        "poweroff",
    ];
    // Act
    let guest = run_with_disk(&disk, &cmds);

    // Assert
    let check = guest.ok("blk-check", 0);
    assert_eq!(value(check, "result"), Some("match"), "{check}");
    let wrong_seed = guest.err("blk-check", 1);
    assert!(
        wrong_seed.contains("mismatch first_bad_sector=0 bad_sectors=16"),
        "{wrong_seed}"
    );
    let sum = guest.ok("blk-sum", 0);
    assert_eq!(value(sum, "fnv1a64"), Some(host_hash.as_str()), "{sum}");
}

#[test]
fn test_testguest_readonly_disk_refuses_write_and_stays_unchanged() {
    // Arrange
    let disk = ScratchDisk::with_pattern("readonly", DISK_BYTES, 5);
    let before = disk.read();
    let cmds = ["blk", "blk-write 0 0 8 6", "blk-check 0 0 8 5", "poweroff"];
    let run = GuestRun {
        disks: vec![format!("{},readonly", disk.arg())],
        ..GuestRun::new(&cmds)
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    let blk = guest.details("blk");
    assert_eq!(blk.len(), 1, "{}", guest.context());
    assert_eq!(
        num(blk[0], "ro"),
        1,
        "VIRTIO_BLK_F_RO must be offered: {}",
        blk[0]
    );
    let write = guest.err("blk-write", 0);
    assert!(
        write.contains("status=IOERR") || write.contains("status=UNSUPP"),
        "{write}"
    );
    let check = guest.ok("blk-check", 0);
    assert_eq!(value(check, "result"), Some("match"), "{check}");
    assert!(
        disk.read() == before,
        "a read-only disk changed on the host"
    );
}

/// Fill a disk with pattern `seed`, have the guest clear the 64 sectors at `first` with
/// `command` ("blk-zeroes" or "blk-discard") and flush, then check, in the guest and in the
/// host file, that the range reads back as zeroes and its 64-sector neighbours are intact.
fn assert_guest_clears_range(command: &str, seed: u64, first: u64) {
    // Arrange
    let disk = ScratchDisk::with_pattern(command, DISK_BYTES, seed);
    let clear = format!("{command} 0 {first} 64");
    let check_before = format!("blk-check 0 {} 64 {seed}", first - 64);
    let check_after = format!("blk-check 0 {} 64 {seed}", first + 64);
    let cmds = [
        &clear,
        "blk-flush 0",
        &check_before,
        &check_after,
        "poweroff",
    ];
    // Act
    let guest = run_with_disk(&disk, &cmds);

    // Assert
    guest.ok(command, 0);
    assert_eq!(guest.ok("blk-flush", 0), "OK blk-flush 0");
    guest.ok("blk-check", 0);
    guest.ok("blk-check", 1);
    let bytes = disk.read();
    assert_eq!(
        bytes.len() as u64,
        DISK_BYTES,
        "{command} changed the image size"
    );
    let sector = |s: u64| (s * 512) as usize;
    assert!(
        bytes[sector(first)..sector(first + 64)]
            .iter()
            .all(|&b| b == 0),
        "{command} range does not read back as zeroes on the host"
    );
    assert!(
        bytes[sector(first - 64)..sector(first)] == pattern_bytes(seed, first - 64, 64)[..],
        "bytes before the {command} range changed"
    );
    assert!(
        bytes[sector(first + 64)..sector(first + 128)] == pattern_bytes(seed, first + 64, 64)[..],
        "bytes after the {command} range changed"
    );
}

#[test]
fn test_testguest_flush_and_write_zeroes_reach_the_host_file() {
    assert_guest_clears_range("blk-zeroes", 11, 64);
}

#[test]
fn test_testguest_discard_reads_back_zero_and_keeps_neighbours() {
    assert_guest_clears_range("blk-discard", 21, 256);
}

#[test]
fn test_testguest_two_disks_have_their_ids_and_separate_data() {
    // Arrange
    let a = ScratchDisk::zeroed("id-a", DISK_BYTES);
    let b = ScratchDisk::zeroed("id-b", 2 * DISK_BYTES);
    let cmds = [
        "blk",
        "blk-id 0",
        "blk-id 1",
        "blk-write 1 10 4 3",
        "blk-sum 0 0 8192",
        "poweroff",
    ];
    let run = GuestRun {
        disks: vec![
            format!("{},id=first-disk", a.arg()),
            format!("{},id=SECOND", b.arg()),
        ],
        ..GuestRun::new(&cmds)
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    let blk = guest.details("blk");
    assert_eq!(blk.len(), 2, "{}", guest.context());
    assert_eq!(num(blk[0], "capacity"), SECTORS, "{}", blk[0]);
    assert_eq!(num(blk[1], "capacity"), 2 * SECTORS, "{}", blk[1]);
    assert_eq!(value(guest.ok("blk-id", 0), "id"), Some("first-disk"));
    assert_eq!(value(guest.ok("blk-id", 1), "id"), Some("SECOND"));
    guest.ok("blk-write", 0);
    assert!(
        a.read().iter().all(|&x| x == 0),
        "disk 0 changed by a write to disk 1"
    );
    assert!(
        b.read()[10 * 512..14 * 512] == pattern_bytes(3, 10, 4)[..],
        "disk 1 lacks the pattern"
    );
    assert_eq!(
        value(guest.ok("blk-sum", 0), "fnv1a64"),
        Some(fnv_hex(&a.read()).as_str())
    );
}

#[test]
fn test_testguest_virtio_blk_msix_interrupts_are_delivered() {
    // Arrange
    let disk = ScratchDisk::zeroed("msix", DISK_BYTES);
    // Act
    let guest = run_with_disk(&disk, &["blk-sum 0 0 1024", "blk", "irqs", "poweroff"]);

    // Assert
    guest.ok("blk-sum", 0);
    let blk = guest.details("blk");
    assert_eq!(blk.len(), 1, "{}", guest.context());
    assert_ne!(
        value(blk[0], "msix_vector"),
        Some("-1"),
        "MSI-X not accepted: {}",
        blk[0]
    );
    assert!(
        num(blk[0], "msix_irqs") >= 1,
        "no MSI-X interrupt arrived for 8 completed requests: {}",
        blk[0]
    );
    assert!(num(guest.ok("irqs", 0), "msix") >= 1);
}

#[test]
fn test_pattern_reference_known_values_match() {
    // Arrange
    let mut sector = [0u8; 512];

    // Act
    common::pattern::fill_sector(0, 0, &mut sector);
    let empty = common::pattern::fnv1a64(common::pattern::FNV_OFFSET, b"");
    let a = common::pattern::fnv1a64(common::pattern::FNV_OFFSET, b"a");

    // Assert
    assert_eq!(common::pattern::splitmix64(0), 0xe220_a839_7b1d_cdaf);
    assert_eq!(sector[..8], 0xe220_a839_7b1d_cdafu64.to_le_bytes());
    assert_eq!(empty, 0xcbf2_9ce4_8422_2325);
    assert_eq!(a, 0xaf63_dc4c_8601_ec8c);
}
