//! Live external disk snapshots with the test guest: `{"op":"disk-snapshot"}` puts a qcow2
//! overlay on every disk of a running VM at one point; `ferrite disk revert` goes back to an
//! older layer (the later writes are gone when the guest reads the disk again);
//! `ferrite disk flatten` merges a chain into one image the guest reads the same data from;
//! failures leave the VM on its old images and name the problem.

mod common;
mod testguest_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testguest_common::control::Vm;
use testguest_common::{pattern_bytes, GuestRun, WATCHDOG};

const DISK_BYTES: u64 = 1 << 20;

/// A fresh directory for one test's images, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferrite-dsnap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Dir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn ferrite_disk(args: &[&str]) -> Output {
    Command::new(common::ferrite_bin())
        .arg("disk")
        .args(args)
        .output()
        .expect("run ferrite disk")
}

fn ferrite_disk_ok(args: &[&str]) -> String {
    let out = ferrite_disk(args);
    assert!(
        out.status.success(),
        "ferrite disk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ferrite_disk_err(args: &[&str]) -> String {
    let out = ferrite_disk(args);
    assert!(
        !out.status.success(),
        "ferrite disk {args:?} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A raw `disk0.img` and a qcow2 `disk1.qcow2`, both empty.
fn two_base_disks(dir: &Dir) -> (PathBuf, PathBuf) {
    let (raw, qcow2) = (dir.join("disk0.img"), dir.join("disk1.qcow2"));
    ferrite_disk_ok(&["create", "--format", "raw", s(&raw), "1M"]);
    ferrite_disk_ok(&["create", "--format", "qcow2", s(&qcow2), "1M"]);
    (raw, qcow2)
}

/// A test guest with a control socket and `disks` (`--disk` values), running `cmds`.
fn start(name: &str, disks: &[String], cmds: &str) -> Vm {
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        common::asset("testguest.elf").display().to_string(),
        "--memory".into(),
        "128M".into(),
        "--cmdline".into(),
        format!("cmds=\"{cmds}\""),
    ];
    for d in disks {
        args.extend(["--disk".into(), d.clone()]);
    }
    Vm::spawn(name, &args)
}

fn disk_snapshot(vm: &mut Vm, tag: &str) -> serde_json::Value {
    vm.request(&format!(r#"{{"op":"disk-snapshot","tag":"{tag}"}}"#))
}

fn guest_cmd(vm: &mut Vm, cmd: &str, answer: &str) -> String {
    vm.send(cmd);
    vm.wait_line(answer)
}

fn power_off(mut vm: Vm) {
    vm.send("poweroff");
    vm.wait_line("OK poweroff");
    assert!(vm.wait_exit(WATCHDOG).success());
}

/// Boot a fresh VM on `disks`, run `cmds` and power off; the console's answer lines.
fn boot_and_run(disks: Vec<String>, cmds: &[&str]) -> Vec<String> {
    let guest = GuestRun {
        disks,
        ..GuestRun::new(cmds)
    }
    .run();
    guest.assert_powered_off();
    guest.answers().iter().map(|l| l.to_string()).collect()
}

fn chain_paths(reply: &serde_json::Value, disk: usize) -> Vec<String> {
    reply["disks"][disk]["chain"]
        .as_array()
        .unwrap_or_else(|| panic!("no chain for disk{disk}: {reply}"))
        .iter()
        .map(|e| e["path"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn test_revert_to_the_snapshot_drops_the_later_writes_on_both_disks() {
    // Arrange: pattern A on both disks, a live snapshot of both, pattern B over part of A.
    let dir = Dir::new("revert");
    let (raw, qcow2) = two_base_disks(&dir);
    let disks = [
        format!("{},format=raw", s(&raw)),
        format!("{},format=qcow2", s(&qcow2)),
    ];
    let mut vm = start(
        "dsnap-revert",
        &disks,
        "blk-write 0 0 64 1;blk-write 1 0 64 2",
    );
    vm.wait_line("OK blk-write 1 ");
    let snap = disk_snapshot(&mut vm, "s1");
    guest_cmd(&mut vm, "blk-write 0 16 16 3", "OK blk-write 0 ");
    guest_cmd(&mut vm, "blk-write 1 16 16 4", "OK blk-write 1 ");
    let sees_b = guest_cmd(&mut vm, "blk-check 0 16 16 3", "OK blk-check");
    let chain = vm.request(r#"{"op":"disk-chain"}"#);
    let info = vm.request(r#"{"op":"info"}"#);
    let (top0, top1) = (dir.join("disk0@s1.qcow2"), dir.join("disk1@s1.qcow2"));
    let refused_while_running = ferrite_disk_err(&["revert", s(&top0), "--to", "1"]);
    power_off(vm);

    // Act: revert both disks to the layer below the snapshot, boot again.
    let (new0, new1) = (dir.join("disk0@r.qcow2"), dir.join("disk1@r.qcow2"));
    let reverted = ferrite_disk_ok(&["revert", s(&top0), "--to", "1", "-o", s(&new0), "--json"]);
    ferrite_disk_ok(&["revert", s(&top1), "--to", s(&qcow2), "-o", s(&new1)]);
    let answers = boot_and_run(
        vec![
            format!("{},format=qcow2", s(&new0)),
            format!("{},format=qcow2", s(&new1)),
        ],
        &["blk-check 0 0 64 1", "blk-check 1 0 64 2", "poweroff"],
    );

    // Assert
    assert_eq!(snap["ok"], true, "{snap}");
    assert_eq!(snap["disks"][0]["path"], s(&top0), "{snap}");
    assert_eq!(snap["disks"][1]["path"], s(&top1), "{snap}");
    assert!(
        sees_b.contains("result=match"),
        "B is written after the snapshot: {sees_b}"
    );
    assert_eq!(chain_paths(&chain, 0), vec![s(&top0), s(&raw)], "{chain}");
    assert_eq!(chain_paths(&chain, 1), vec![s(&top1), s(&qcow2)], "{chain}");
    assert_eq!(info["config"]["disks"][0]["path"], s(&top0), "{info}");
    assert!(
        refused_while_running.contains("in use by a running VM"),
        "{refused_while_running}"
    );
    let reverted: serde_json::Value = serde_json::from_str(&reverted).expect("revert --json");
    assert_eq!(reverted["detached"][0], s(&top0), "{reverted}");
    assert!(top0.exists(), "the reverted-away layer is kept");
    let checks: Vec<&String> = answers.iter().filter(|l| l.contains("blk-check")).collect();
    assert_eq!(checks.len(), 2, "{answers:?}");
    for line in checks {
        assert!(
            line.contains("result=match"),
            "pattern A whole again, B gone: {answers:?}"
        );
    }
}

#[test]
fn test_flattened_chain_gives_a_fresh_vm_every_layers_data() {
    // Arrange: three layers (base, s1, s2), each written in a different place.
    let dir = Dir::new("flatten");
    let base = dir.join("disk0.img");
    ferrite_disk_ok(&["create", "--format", "raw", s(&base), "1M"]);
    let mut vm = start(
        "dsnap-flatten",
        &[format!("{},format=raw", s(&base))],
        "blk-write 0 0 64 1",
    );
    vm.wait_line("OK blk-write 0 ");
    let first = disk_snapshot(&mut vm, "s1");
    guest_cmd(&mut vm, "blk-write 0 16 16 3", "OK blk-write 0 ");
    let second = disk_snapshot(&mut vm, "s2");
    guest_cmd(&mut vm, "blk-write 0 100 8 5", "OK blk-write 0 ");
    power_off(vm);
    let top = dir.join("disk0@s2.qcow2");
    let chain: serde_json::Value =
        serde_json::from_str(&ferrite_disk_ok(&["chain", s(&top), "--json"])).expect("json");

    // Act: flatten to a new image, then take every layer away.
    let flat = dir.join("flat.qcow2");
    ferrite_disk_ok(&["flatten", s(&top), "-o", s(&flat)]);
    for layer in [&top, &dir.join("disk0@s1.qcow2"), &base] {
        std::fs::remove_file(layer).expect("remove layer");
    }
    let flat_chain = ferrite_disk_ok(&["chain", s(&flat)]);
    let answers = boot_and_run(
        vec![format!("{},format=qcow2", s(&flat))],
        &[
            "blk-check 0 0 16 1",
            "blk-check 0 16 16 3",
            "blk-check 0 32 32 1",
            "blk-check 0 100 8 5",
            "poweroff",
        ],
    );

    // Assert
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(
        second["disks"][0]["backing"],
        s(&dir.join("disk0@s1.qcow2"))
    );
    let listed: Vec<&str> = chain
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert_eq!(
        listed,
        vec![s(&top), s(&dir.join("disk0@s1.qcow2")), s(&base)]
    );
    assert_eq!(flat_chain.lines().count(), 1, "standalone: {flat_chain}");
    let checks: Vec<&String> = answers.iter().filter(|l| l.contains("blk-check")).collect();
    assert_eq!(checks.len(), 4, "{answers:?}");
    for line in checks {
        assert!(line.contains("result=match"), "{answers:?}");
    }
}

#[test]
fn test_failed_disk_snapshot_leaves_every_disk_on_its_image() {
    // Arrange: disk1's overlay name is taken, so the snapshot fails after disk0's overlay
    // was made.
    let dir = Dir::new("rollback");
    let (raw, qcow2) = two_base_disks(&dir);
    let taken = dir.join("disk1@s1.qcow2");
    std::fs::write(&taken, b"not mine").expect("write blocker");
    let disks = [
        format!("{},format=raw", s(&raw)),
        format!("{},format=qcow2", s(&qcow2)),
    ];
    let mut vm = start("dsnap-rollback", &disks, "echo up");
    vm.wait_line("OK echo up");

    // Act
    let failed = disk_snapshot(&mut vm, "s1");
    let bad_tag = disk_snapshot(&mut vm, "../escape");
    let write = guest_cmd(&mut vm, "blk-write 0 8 8 6", "OK blk-write 0 ");
    let info = vm.request(r#"{"op":"info"}"#);
    power_off(vm);

    // Assert: the error names the file, nothing was switched, the guest kept writing to the
    // raw base (made writable again), and the blocker is untouched.
    assert_eq!(failed["error"], "disk-snapshot-failed", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(s(&taken)) && message.contains("choose another tag"),
        "{failed}"
    );
    assert!(
        !dir.join("disk0@s1.qcow2").exists(),
        "disk0's overlay is removed"
    );
    assert_eq!(bad_tag["error"], "bad-request", "{bad_tag}");
    assert!(write.starts_with("OK blk-write"), "{write}");
    assert_eq!(info["config"]["disks"][0]["path"], s(&raw), "{info}");
    let bytes = std::fs::read(&raw).expect("read base");
    assert!(
        bytes[8 * 512..16 * 512] == pattern_bytes(6, 8, 8)[..],
        "write reached the base"
    );
    assert_eq!(std::fs::read(&taken).expect("read blocker"), b"not mine");
    assert_eq!(std::fs::metadata(&raw).expect("stat").len(), DISK_BYTES);
}

#[test]
fn test_offline_chain_commands_name_bad_input() {
    // Arrange
    let dir = Dir::new("badinput");
    let (raw, qcow2) = two_base_disks(&dir);
    let missing = dir.join("nope.qcow2");

    // Act
    let no_image = ferrite_disk_err(&["chain", s(&missing)]);
    let no_element = ferrite_disk_err(&[
        "revert",
        s(&raw),
        "--to",
        "3",
        "-o",
        s(&dir.join("x.qcow2")),
    ]);
    let not_in_chain = ferrite_disk_err(&[
        "revert",
        s(&raw),
        "--to",
        s(&missing),
        "-o",
        s(&dir.join("y.qcow2")),
    ]);
    let flatten_exists = ferrite_disk_err(&["flatten", s(&raw), "-o", s(&qcow2)]);

    // Assert
    assert!(no_image.contains(s(&missing)), "{no_image}");
    assert!(no_element.contains("there is no image 3"), "{no_element}");
    assert!(
        not_in_chain.contains("is not in this disk's chain"),
        "{not_in_chain}"
    );
    assert!(
        flatten_exists.contains("already exists"),
        "{flatten_exists}"
    );
    assert!(!dir.join("x.qcow2").exists() && !dir.join("y.qcow2").exists());
}

#[test]
fn test_vm_snapshot_after_a_disk_snapshot_restores_onto_the_overlay() {
    // Arrange: A on the base, a disk snapshot, B through the overlay, then a VM snapshot.
    let dir = Dir::new("vmsnap");
    let base = dir.join("disk0.img");
    ferrite_disk_ok(&["create", "--format", "raw", s(&base), "1M"]);
    let mut vm = start(
        "dsnap-vmsnap",
        &[format!("{},format=raw", s(&base))],
        "blk-write 0 0 64 1",
    );
    vm.wait_line("OK blk-write 0 ");
    disk_snapshot(&mut vm, "s1");
    guest_cmd(&mut vm, "blk-write 0 16 16 3", "OK blk-write 0 ");
    let state_dir = dir.join("vm-snap");
    let snap = vm.request(&format!(
        r#"{{"op":"snapshot","path":"{}"}}"#,
        s(&state_dir)
    ));
    drop(vm);

    // Act: continue the VM from its snapshot in a new process.
    let mut restored = Vm::spawn(
        "dsnap-vmsnap-r",
        &["--restore".into(), s(&state_dir).into()],
    );
    let sees_b = guest_cmd(&mut restored, "blk-check 0 16 16 3", "OK blk-check");
    let sees_a = guest_cmd(&mut restored, "blk-check 0 32 32 1", "OK blk-check");
    let info = restored.request(r#"{"op":"info"}"#);
    drop(restored);

    // Assert: the snapshot's configuration names the overlay, so the restored guest reads B
    // (which never reached the frozen base).
    assert_eq!(snap["ok"], true, "{snap}");
    assert_eq!(
        info["config"]["disks"][0]["path"],
        s(&dir.join("disk0@s1.qcow2")),
        "{info}"
    );
    assert!(sees_b.contains("result=match"), "{sees_b}");
    assert!(sees_a.contains("result=match"), "{sees_a}");
    let bytes = std::fs::read(&base).expect("read base");
    assert!(
        bytes[16 * 512..32 * 512] == pattern_bytes(1, 16, 16)[..],
        "the base keeps A"
    );
}
