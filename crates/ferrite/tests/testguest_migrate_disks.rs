//! Block migration with the test guest: a guest on a local disk (raw, or qcow2 over a
//! backing file) keeps writing a checksummed pattern (`blk-stream`) while it migrates with
//! `copy_disks`; the destination creates its own standalone image in `--incoming-disk-dir`
//! and the guest verifies every write there; the source's image is not touched after the
//! commit. A cut during the disk copy leaves the source running on a good disk and the
//! destination's disk directory empty; a file in the way is refused before data moves.

mod common;
mod testguest_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use testguest_common::control::Vm;
use testguest_common::migrate::*;
use testguest_common::{fnv_hex, num, pattern_bytes, ScratchDisk, WATCHDOG};

/// Sectors of the test disks (32 MiB).
const DISK_SECTORS: u64 = 65536;
/// Where `blk-stream` writes: sectors STREAM_FIRST..STREAM_FIRST+STREAM_SECTORS.
const STREAM_FIRST: u64 = 8192;
const STREAM_SECTORS: u64 = 16384;
const STREAM_SEED: u64 = 100;

/// A directory in the temp dir for the destination's disks, removed on drop.
struct DiskDir(PathBuf);

impl DiskDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ferrite-mig-disks-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the disk dir");
        DiskDir(dir)
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }

    fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .expect("read the disk dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for DiskDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn destination(name: &str, endpoint: &str, dir: &DiskDir) -> Vm {
    start_destination_with(name, endpoint, &["--incoming-disk-dir".into(), dir.arg()])
}

fn guest_with_disk(name: &str, disk_arg: &str, cmds: &str) -> Vm {
    Vm::boot(
        name,
        &[
            "--disk".into(),
            disk_arg.into(),
            "--cmdline".into(),
            format!("cmds=\"{cmds}\""),
        ],
    )
}

fn file_hash(path: &Path) -> String {
    fnv_hex(&std::fs::read(path).expect("read image"))
}

/// Stop the guest's `blk-stream` and check with `blk-check` that the stream's region holds
/// what the stream wrote (pass P up to NEXT, pass P-1 after it); returns the check lines.
fn stop_stream_and_check(vm: &mut Vm) -> (String, Vec<String>) {
    vm.send("x");
    let stopped = vm.wait_line("OK blk-stream stopped");
    let (pass, next) = (num(&stopped, "pass"), num(&stopped, "next"));
    let end = STREAM_FIRST + STREAM_SECTORS;
    let mut checks = Vec::new();
    let mut ranges = vec![(STREAM_FIRST, next - STREAM_FIRST, STREAM_SEED + pass)];
    if pass > 0 {
        ranges.push((next, end - next, STREAM_SEED + pass - 1));
    }
    for (first, count, seed) in ranges.into_iter().filter(|r| r.1 > 0) {
        vm.send(&format!("blk-check 0 {first} {count} {seed}"));
        checks.push(vm.wait_any(&["OK blk-check", "ERR blk-check"]));
    }
    (stopped, checks)
}

fn assert_all_match(lines: &[String]) {
    for line in lines {
        assert!(line.ends_with("result=match"), "{line}");
    }
}

/// Migrate `src` (whose guest streams writes to its disk) with disk copy to a fresh
/// destination; returns (source stderr, destination).
fn migrate_with_disk_copy(src: &mut Vm, name: &str, dir: &DiskDir) -> (String, Vm) {
    let endpoint = free_tcp_endpoint();
    let dst = destination(name, &endpoint, dir);
    migrate(
        src,
        serde_json::json!({"to": endpoint, "copy_disks": true, "bandwidth_mib_s": 32,
                           "downtime_ms": 100}),
    );
    let src_exit = src.wait_exit(WATCHDOG);
    let stderr = stderr_of(src);
    assert_eq!(src_exit.code(), Some(MIGRATED), "{stderr}");
    (stderr, dst)
}

#[test]
fn test_local_raw_disk_written_during_migration_is_consistent_on_the_destination() {
    // Arrange: a 32 MiB local raw disk; the guest writes 4 MiB of pattern, then keeps
    // rewriting 8 MiB after it.
    let disk = ScratchDisk::zeroed("migd-raw", DISK_SECTORS * 512);
    let dir = DiskDir::new("raw");
    let mut src = guest_with_disk(
        "migd-raw",
        &format!("{},format=raw", disk.arg()),
        &format!("blk-write 0 0 {STREAM_FIRST} 7;blk-stream 0 {STREAM_FIRST} {STREAM_SECTORS} {STREAM_SEED}"),
    );
    src.wait_line("OK blk-write");
    let before = src.wait_line("blk-stream writes=");

    // Act: migrate while the guest writes; on the destination stop the stream and verify.
    let (src_stderr, mut dst) = migrate_with_disk_copy(&mut src, "migd-raw-d", &dir);
    let source_image_at_commit = file_hash(disk.path());
    let after = dst.wait_line("blk-stream writes=");
    let (_, stream_checks) = stop_stream_and_check(&mut dst);
    dst.send(&format!("blk-check 0 0 {STREAM_FIRST} 7"));
    let head_check = dst.wait_any(&["OK blk-check", "ERR blk-check"]);
    dst.send(&format!("blk-sum 0 0 {DISK_SECTORS}"));
    let dst_sum = dst.wait_any(&["OK blk-sum", "ERR blk-sum"]);
    dst.send("poweroff");
    let dst_exit = dst.wait_exit(WATCHDOG);
    let received = dir.0.join(disk.path().file_name().unwrap());
    let received_bytes = std::fs::read(&received).expect("the received image");

    // Assert: every write checks out on the destination, whose image is its own file with
    // the guest's view; the source's image did not change after the commit.
    assert!(src_stderr.contains("disks:"), "{src_stderr}");
    assert!(
        num(&after, "writes") > num(&before, "writes"),
        "{before} / {after}"
    );
    assert_all_match(&stream_checks);
    assert!(head_check.ends_with("result=match"), "{head_check}");
    assert!(dst_exit.success(), "{dst_exit:?}");
    assert_eq!(
        dst_sum.rsplit("fnv1a64=").next().unwrap(),
        fnv_hex(&received_bytes),
        "the guest's view is the received image"
    );
    assert_eq!(
        &received_bytes[..512 * STREAM_FIRST as usize],
        &pattern_bytes(7, 0, STREAM_FIRST)[..]
    );
    assert_eq!(file_hash(disk.path()), source_image_at_commit);
}

#[test]
fn test_qcow2_disk_over_a_backing_file_arrives_as_a_standalone_image() {
    // Arrange: base (raw, pattern 11 everywhere) <- overlay.qcow2; the guest writes 1 MiB of
    // pattern 7 at the start and streams writes after 4 MiB.
    let base = ScratchDisk::with_pattern("migd-base", DISK_SECTORS * 512, 11);
    let overlay =
        std::env::temp_dir().join(format!("ferrite-migd-{}-overlay.qcow2", std::process::id()));
    let _ = std::fs::remove_file(&overlay);
    let created = Command::new(common::ferrite_bin())
        .args(["disk", "create", "--format", "qcow2", "--backing"])
        .arg(base.path())
        .args(["--backing-format", "raw"])
        .arg(&overlay)
        .output()
        .expect("ferrite disk create");
    assert!(created.status.success(), "{created:?}");
    let dir = DiskDir::new("qcow2");
    let mut src = guest_with_disk(
        "migd-qcow2",
        &format!("{},format=qcow2", overlay.display()),
        &format!("blk-write 0 0 2048 7;blk-stream 0 {STREAM_FIRST} {STREAM_SECTORS} {STREAM_SEED}"),
    );
    src.wait_line("OK blk-write");
    src.wait_line("blk-stream writes=");

    // Act
    let (_, mut dst) = migrate_with_disk_copy(&mut src, "migd-qcow2-d", &dir);
    let overlay_at_commit = file_hash(&overlay);
    dst.wait_line("blk-stream writes=");
    let (_, stream_checks) = stop_stream_and_check(&mut dst);
    let mut checks = Vec::new();
    for (first, count, seed) in [
        (0, 2048, 7),
        (2048, STREAM_FIRST - 2048, 11),
        (
            STREAM_FIRST + STREAM_SECTORS,
            DISK_SECTORS - STREAM_FIRST - STREAM_SECTORS,
            11,
        ),
    ] {
        dst.send(&format!("blk-check 0 {first} {count} {seed}"));
        checks.push(dst.wait_any(&["OK blk-check", "ERR blk-check"]));
    }
    dst.send("poweroff");
    let dst_exit = dst.wait_exit(WATCHDOG);
    let received = dir.0.join(overlay.file_name().unwrap());
    let header = std::fs::read(&received).expect("the received image");
    let overlay_after = file_hash(&overlay);
    let _ = std::fs::remove_file(&overlay);

    // Assert: the guest sees its writes and the backing file's data through an image that
    // has no backing file (qcow2 header: magic, backing_file_offset 0).
    assert_all_match(&stream_checks);
    assert_all_match(&checks);
    assert!(dst_exit.success(), "{dst_exit:?}");
    assert_eq!(&header[..4], b"QFI\xfb");
    assert_eq!(
        &header[8..16],
        &[0u8; 8],
        "the received image has no backing file"
    );
    assert_eq!(overlay_after, overlay_at_commit);
}

#[test]
fn test_connection_cut_during_the_disk_copy_leaves_the_source_running_and_no_image_behind() {
    // Arrange: 32 MiB of disk data; the proxy cuts the stream after 12 MiB, during the disk
    // copy (the test guest's touched memory is far smaller).
    let disk = ScratchDisk::with_pattern("migd-cut", DISK_SECTORS * 512, 5);
    let dir = DiskDir::new("cut");
    let mut src = guest_with_disk(
        "migd-cut",
        &format!("{},format=raw", disk.arg()),
        &format!("blk-stream 0 0 {STREAM_FIRST} {STREAM_SEED}"),
    );
    src.wait_line("blk-stream writes=");
    let endpoint = free_tcp_endpoint();
    let mut dst = destination("migd-cut-d", &endpoint, &dir);
    let proxy = cutting_proxy(&endpoint, Cut::SourceBytes(12 << 20));

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": proxy, "copy_disks": true, "bandwidth_mib_s": 32}),
    );
    let (status, _) = wait_migration(&mut src);
    let (dst_code, dst_stderr) = assert_never_ran(&mut dst);
    src.wait_line("blk-stream writes=");
    src.send("x");
    let stopped = src.wait_line("OK blk-stream stopped");
    let (pass, next) = (num(&stopped, "pass"), num(&stopped, "next"));
    let mut checks = Vec::new();
    let mut ranges = vec![
        (0, next, STREAM_SEED + pass),
        (STREAM_FIRST, DISK_SECTORS - STREAM_FIRST, 5),
    ];
    if pass > 0 {
        ranges.push((next, STREAM_FIRST - next, STREAM_SEED + pass - 1));
    }
    for (first, count, seed) in ranges.into_iter().filter(|r| r.1 > 0) {
        src.send(&format!("blk-check 0 {first} {count} {seed}"));
        checks.push(src.wait_any(&["OK blk-check", "ERR blk-check"]));
    }

    // Assert
    assert_eq!(status["phase"], "failed", "{status}");
    assert!(
        status["disk_sent_bytes"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    assert_eq!(dst_code, Some(2), "{dst_stderr}");
    assert_all_match(&checks);
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
}

#[test]
fn test_existing_file_at_the_destination_path_is_refused_before_data_moves() {
    // Arrange: the destination's disk dir already has a file of the disk's name.
    let disk = ScratchDisk::with_pattern("migd-exists", 4 << 20, 3);
    let dir = DiskDir::new("exists");
    let in_the_way = dir.0.join(disk.path().file_name().unwrap());
    std::fs::write(&in_the_way, b"precious").expect("write the file in the way");
    let mut src = guest_with_disk(
        "migd-exists",
        &format!("{},format=raw", disk.arg()),
        "dirty 4 500 100",
    );
    src.wait_line("tick n=2 ");
    let endpoint = free_tcp_endpoint();
    let mut dst = destination("migd-exists-d", &endpoint, &dir);

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": endpoint, "copy_disks": true}),
    );
    let (status, _) = wait_migration(&mut src);
    let (dst_code, _) = assert_never_ran(&mut dst);

    // Assert: refused at the hello, nothing sent; the file is untouched; the source runs.
    let error = status["error"].as_str().unwrap_or_default();
    assert_eq!(status["phase"], "failed", "{status}");
    assert!(error.contains("already exists"), "{error}");
    assert!(error.contains("--incoming-disk-dir"), "{error}");
    assert_eq!(status["pages_sent"], 0, "{status}");
    assert_eq!(status["disk_sent_bytes"], 0, "{status}");
    assert_eq!(dst_code, Some(2));
    assert_eq!(std::fs::read(&in_the_way).unwrap(), b"precious");
    assert_eq!(dir.entries().len(), 1);
    assert_source_runs_on(&mut src);
}
