//! Clones: one snapshot of the test guest (with a NIC, vsock and a disk) restored five times
//! with `ferrite run --restore DIR --clone-identity FILE`. Each clone's guest reports, on its
//! console, its own MAC and vsock CID (read from virtio config space), a new VM generation ID
//! (read at the address the DSDT's `VGEN.ADDR` gives, with the "changed" GPE pending), and
//! disk writes that stay in its own qcow2 overlay; the clones share the snapshot's memory
//! pages, so together they take far less memory than five separate VMs.
//!
//! Runs in a network namespace of its own (TAPs are created there); needs root and `ip`.

mod common;
mod testguest_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::netns::Netns;
use testguest_common::control::Vm;
use testguest_common::{value, ScratchDisk, READY, WATCHDOG};

/// Clones started from the one snapshot.
const CLONES: usize = 5;
/// Guest memory the source fills before the snapshot (MiB), and every clone reads back.
const FILLED_MIB: u64 = 48;

/// A fresh scratch directory for sockets, the snapshot, identities and overlays.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrite-clone-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Boot the source: one auto-created TAP, vsock CID 3, a raw disk, `cmds` at boot.
fn start_source(name: &str, dir: &Path, disk: &ScratchDisk, cmds: &str) -> Vm {
    Vm::boot(
        name,
        &[
            "--net".into(),
            "--vsock".into(),
            format!("cid=3,socket={}", dir.join("src.vsock").display()),
            "--disk".into(),
            format!("{},format=raw", disk.arg()),
            "--cmdline".into(),
            format!("cmds=\"{cmds}\""),
        ],
    )
}

fn snapshot(vm: &mut Vm, path: &Path) {
    let reply = vm.request(&format!(
        r#"{{"op":"snapshot","path":"{}"}}"#,
        path.display()
    ));
    assert_eq!(reply["ok"], true, "{reply}");
}

/// Write clone `i`'s identity file: a new TAP and random MAC, CID 10+i, an overlay.
fn identity(dir: &Path, i: usize) -> PathBuf {
    let file = dir.join(format!("clone{i}.json"));
    let id = serde_json::json!({
        "nets": [{}],
        "vsock": {"cid": 10 + i, "socket": dir.join(format!("c{i}.vsock"))},
        "disks": [{"overlay": dir.join(format!("c{i}.qcow2"))}],
    });
    std::fs::write(&file, id.to_string()).unwrap();
    file
}

fn start_clone(name: &str, snap: &Path, identity: &Path) -> Vm {
    Vm::spawn(
        name,
        &[
            "--restore".into(),
            snap.display().to_string(),
            "--clone-identity".into(),
            identity.display().to_string(),
        ],
    )
}

/// `key=` of a console line, as a string.
fn field(line: &str, key: &str) -> String {
    value(line, key)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

/// `(Rss, Pss)` of a process in KiB, from /proc/PID/smaps_rollup.
fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in smaps_rollup: {text}"))
    };
    (get("Rss:"), get("Pss:"))
}

/// What one clone's guest said about itself.
struct Report {
    mac: String,
    cid: String,
    vmgenid: String,
    changed: String,
    base_check: String,
    own_check: String,
}

#[test]
fn test_five_clones_have_own_mac_cid_vmgenid_and_disk_and_share_memory() {
    // Arrange: a source guest that brought up its NIC and vsock, read its generation ID,
    // wrote a pattern to its disk and filled guest memory; snapshotted, then stopped (a
    // clone's base image must not change).
    let _ns = Netns::enter();
    let dir = scratch_dir("five");
    let disk = ScratchDisk::zeroed("clone-base", 1 << 20);
    let snap = dir.join("snap");
    let mut source = start_source(
        "clone-src",
        &dir,
        &disk,
        &format!("net-up 0 10.0.0.2/24;vsock;vmgenid;blk-write 0 0 64 7;mem-fill 5 {FILLED_MIB}"),
    );
    let src_mac = field(&source.wait_line("OK net-up"), "mac");
    let src_cid = field(&source.wait_line("OK vsock"), "cid");
    let src_gen = source.wait_line("OK vmgenid");
    source.wait_line("OK blk-write");
    source.wait_line("OK mem-fill");
    snapshot(&mut source, &snap);
    drop(source);
    let base_before = disk.read();

    // Act: five clones of the one snapshot, all running at once; each reports its identity,
    // reads the base's pattern and memory, writes its own sectors and looks for clone 1's.
    let mut clones: Vec<Vm> = (1..=CLONES)
        .map(|i| start_clone(&format!("clone-{i}"), &snap, &identity(&dir, i)))
        .collect();
    let mut reports = Vec::new();
    for (i, vm) in clones.iter_mut().enumerate() {
        let seed = 20 + i;
        vm.send("vmgenid");
        let gen = vm.wait_line("OK vmgenid");
        vm.send("net-up 0 10.0.0.3/24");
        let net = vm.wait_line("OK net-up");
        vm.send("vsock");
        let vsock = vm.wait_line("OK vsock");
        vm.send(&format!("mem-check 5 {FILLED_MIB}"));
        let mem = vm.wait_line("OK mem-check");
        assert!(mem.contains("result=match"), "clone {i}: {mem}");
        vm.send("blk-check 0 0 64 7");
        let base_check = vm.wait_line("OK blk-check");
        vm.send(&format!("blk-write 0 64 8 {seed}"));
        vm.wait_line("OK blk-write");
        vm.send(&format!("blk-check 0 64 8 {seed}"));
        let own_check = vm.wait_line("OK blk-check");
        reports.push(Report {
            mac: field(&net, "mac"),
            cid: field(&vsock, "cid"),
            vmgenid: field(&gen, "id"),
            changed: field(&gen, "changed"),
            base_check,
            own_check,
        });
    }
    // Clone 2 looks for clone 1's write (seed 20 at sector 64).
    clones[1].send("blk-check 0 64 8 20");
    let cross = clones[1].wait_any(&["OK blk-check", "ERR blk-check"]);
    let memory: Vec<(u64, u64)> = clones.iter().map(|c| rss_pss_kib(c.child.id())).collect();
    clones[0].send("echo alive");
    clones[0].wait_line("OK echo alive");
    drop(clones);

    // Assert: every identity is new and distinct, read by the guest itself.
    let macs: BTreeSet<_> = reports.iter().map(|r| r.mac.clone()).collect();
    let cids: BTreeSet<_> = reports.iter().map(|r| r.cid.clone()).collect();
    let gens: BTreeSet<_> = reports.iter().map(|r| r.vmgenid.clone()).collect();
    assert_eq!(macs.len(), CLONES, "distinct MACs: {macs:?}");
    assert!(!macs.contains(&src_mac), "{src_mac} is the source's");
    assert_eq!(
        cids,
        (1..=CLONES).map(|i| (10 + i).to_string()).collect(),
        "each guest reads the CID its identity gave"
    );
    assert_ne!(src_cid, "11");
    assert_eq!(gens.len(), CLONES, "distinct generation IDs: {gens:?}");
    assert_eq!(field(&src_gen, "changed"), "0", "{src_gen}");
    assert!(!gens.contains(&field(&src_gen, "id")), "{src_gen}");
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.changed, "1", "clone {i} was notified of its new ID");
        assert!(r.base_check.contains("result=match"), "{}", r.base_check);
        assert!(r.own_check.contains("result=match"), "{}", r.own_check);
    }
    // Disks: clone 1's write is not in clone 2, and the base never changed.
    assert!(cross.starts_with("ERR blk-check mismatch"), "{cross}");
    assert_eq!(disk.read(), base_before, "the base image is unchanged");
    // Memory: the clones share the snapshot's pages, so their proportional set sizes add up
    // to far less than five times what one of them has resident.
    let pss_total: u64 = memory.iter().map(|m| m.1).sum();
    let rss_one = memory[0].0;
    assert!(
        rss_one > FILLED_MIB * 1024,
        "each clone has the filled memory resident: {memory:?}"
    );
    assert!(
        pss_total < 3 * rss_one,
        "combined PSS {pss_total} KiB of {CLONES} clones is not well below {CLONES} x RSS {rss_one} KiB: {memory:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_clone_of_a_running_vms_disk_is_refused_with_the_fix() {
    // Arrange: a source that keeps running on its disk after the snapshot.
    let _ns = Netns::enter();
    let dir = scratch_dir("busy");
    let disk = ScratchDisk::zeroed("clone-busy", 1 << 20);
    let snap = dir.join("snap");
    let mut source = start_source("clone-busy-src", &dir, &disk, "");
    source.wait_line(READY);
    snapshot(&mut source, &snap);

    // Act
    let mut clone = start_clone("clone-busy", &snap, &identity(&dir, 1));
    let status = clone.wait_exit(WATCHDOG);
    let mut stderr = String::new();
    if let Some(mut e) = clone.child.stderr.take() {
        use std::io::Read;
        e.read_to_string(&mut stderr).unwrap();
    }

    // Assert: bad input (exit 2), the message names the image and the fix, no overlay left.
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("open read-write by a running VM") && stderr.contains("stop the source VM"),
        "{stderr}"
    );
    assert!(!dir.join("c1.qcow2").exists());
    source.send("echo still-running");
    source.wait_line("OK echo still-running");
    let _ = std::fs::remove_dir_all(&dir);
}
