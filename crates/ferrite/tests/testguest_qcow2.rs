//! The test guest's virtio-blk driver on qcow2 disks: data the guest writes to an image made
//! by `ferrite disk create` passes `qemu-img check` and converts back to the guest's pattern;
//! an overlay on a raw base shows the base and leaves it untouched; images QEMU made
//! (a raw <- qcow2 <- qcow2 chain, a compressed image) read correctly in the guest.

mod common;
mod testguest_common;

use std::path::Path;
use std::process::Command;

use testguest_common::{fnv_hex, pattern_bytes, value, Guest, GuestRun, ScratchDisk};

const DISK_BYTES: u64 = 4 << 20;
const SECTORS: u64 = DISK_BYTES / 512;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed (qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ferrite_disk(args: &[&str]) {
    let out = Command::new(common::ferrite_bin())
        .arg("disk")
        .args(args)
        .output()
        .expect("run ferrite disk");
    assert!(
        out.status.success(),
        "ferrite disk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_check_clean(img: &Path) {
    let text = tool("qemu-img", &["check", s(img)]);
    assert!(text.contains("No errors were found"), "{text}");
}

/// The guest-visible bytes of `img` according to `qemu-img convert -O raw`.
fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("converted.raw");
    tool("qemu-img", &["convert", "-O", "raw", s(img), s(&out)]);
    let bytes = std::fs::read(&out).expect("read converted image");
    let _ = std::fs::remove_file(&out);
    bytes
}

/// A path next to the scratch files, removed on drop.
struct TempPath(std::path::PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        TempPath(std::env::temp_dir().join(format!("ferrite-qcow2-{}-{name}", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run(disks: Vec<String>, cmds: &[&str]) -> Guest {
    let guest = GuestRun {
        disks,
        ..GuestRun::new(cmds)
    }
    .run();
    guest.assert_powered_off();
    guest
}

#[test]
fn test_qcow2_guest_pattern_passes_check_and_converts_back() {
    // Arrange
    let img = TempPath::new("guest.qcow2");
    ferrite_disk(&["create", "--format", "qcow2", s(&img.0), "4M"]);
    let cmds = [
        "blk-write 0 100 300 7",
        "blk-write 0 7000 1000 8",
        "blk-zeroes 0 7100 200",
        "blk-flush 0",
        "blk-check 0 100 300 7",
        "poweroff",
    ];
    // Act
    let guest = run(vec![format!("{},format=qcow2", s(&img.0))], &cmds);
    // Assert
    guest.ok("blk-write", 0);
    guest.ok("blk-write", 1);
    guest.ok("blk-zeroes", 0);
    let check = guest.ok("blk-check", 0);
    assert_eq!(value(check, "result"), Some("match"), "{check}");
    assert_check_clean(&img.0);
    let bytes = qemu_raw(&img.0);
    let mut expect = vec![0u8; DISK_BYTES as usize];
    expect[100 * 512..400 * 512].copy_from_slice(&pattern_bytes(7, 100, 300));
    expect[7000 * 512..8000 * 512].copy_from_slice(&pattern_bytes(8, 7000, 1000));
    expect[7100 * 512..7300 * 512].fill(0);
    assert!(
        bytes == expect,
        "converted image differs from the guest's writes"
    );
}

#[test]
fn test_qcow2_overlay_reads_base_and_leaves_it_untouched() {
    // Arrange
    let base = ScratchDisk::with_pattern("qcow2-base", DISK_BYTES, 99);
    let base_before = base.read();
    let overlay = TempPath::new("overlay.qcow2");
    ferrite_disk(&[
        "create",
        "--format",
        "qcow2",
        "--backing",
        s(base.path()),
        "--backing-format",
        "raw",
        s(&overlay.0),
    ]);
    let cmds = [
        &format!("blk-check 0 0 {SECTORS} 99"),
        "blk-write 0 50 10 5",
        "blk-check 0 50 10 5",
        "blk-check 0 60 100 99",
        "blk-flush 0",
        "poweroff",
    ];
    // Act
    let guest = run(vec![s(&overlay.0).to_string()], &cmds);
    // Assert
    for n in 0..3 {
        let line = guest.ok("blk-check", n);
        assert_eq!(value(line, "result"), Some("match"), "{line}");
    }
    assert!(base.read() == base_before, "the base image changed");
    assert_check_clean(&overlay.0);
    let mut expect = base_before.clone();
    expect[50 * 512..60 * 512].copy_from_slice(&pattern_bytes(5, 50, 10));
    assert!(qemu_raw(&overlay.0) == expect, "overlay contents differ");
}

#[test]
fn test_qcow2_qemu_made_chain_and_compressed_image_read_in_guest() {
    // Arrange: base raw <- mid qcow2 <- top qcow2, each layer written by qemu-io; and the
    // flattened chain compressed by `qemu-img convert -c`.
    let base = ScratchDisk::with_pattern("qcow2-chain-base", DISK_BYTES, 11);
    let mid = TempPath::new("mid.qcow2");
    let top = TempPath::new("top.qcow2");
    let comp = TempPath::new("comp.qcow2");
    let flat = TempPath::new("flat.raw");
    tool(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(base.path()),
            "-F",
            "raw",
            s(&mid.0),
        ],
    );
    tool("qemu-io", &["-c", "write -P 0x33 64k 128k", s(&mid.0)]);
    tool(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&mid.0),
            "-F",
            "qcow2",
            s(&top.0),
        ],
    );
    tool("qemu-io", &["-c", "write -P 0x44 100k 8k", s(&top.0)]);
    tool("qemu-io", &["-c", "write -z 2M 64k", s(&top.0)]);
    tool("qemu-img", &["convert", "-O", "raw", s(&top.0), s(&flat.0)]);
    tool(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&flat.0),
            s(&comp.0),
        ],
    );
    let expect = fnv_hex(&std::fs::read(&flat.0).expect("flat image"));
    let cmds = [
        &format!("blk-sum 0 0 {SECTORS}"),
        &format!("blk-sum 1 0 {SECTORS}"),
        "poweroff",
    ];
    // Act
    let guest = run(
        vec![
            format!("{},readonly", s(&top.0)),
            format!("{},readonly,format=qcow2", s(&comp.0)),
        ],
        &cmds,
    );
    // Assert
    let chain = guest.ok("blk-sum", 0);
    assert_eq!(value(chain, "fnv1a64"), Some(expect.as_str()), "{chain}");
    let compressed = guest.ok("blk-sum", 1);
    assert_eq!(
        value(compressed, "fnv1a64"),
        Some(expect.as_str()),
        "{compressed}"
    );
}
