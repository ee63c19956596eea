//! Clones through ferrited: `ferrite vm clone VM/SNAPSHOT --count 2` defines and starts two
//! VMs from one snapshot of a test guest with vsock and a disk; each guest reports (on its
//! console) a new VM generation ID and its own vsock CID, each clone records where it came
//! from and has its own overlay, and a clone of a running VM's disk is refused.

mod common;
mod daemon_common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use daemon_common::{create, start, testguest_spec, under, TestDaemon};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(60);

/// Type `line` on VM `name`'s serial console (its console socket).
fn type_line(d: &TestDaemon, name: &str, line: &str) {
    let sock = under(d, &format!("run/vms/{name}/console.sock"));
    let mut s = UnixStream::connect(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.write_all(format!("{line}\r").as_bytes()).unwrap();
}

/// The first console line of VM `name` starting with `prefix` (waits for it).
fn console_line(d: &TestDaemon, name: &str, prefix: &str) -> String {
    d.wait_console(name, prefix, BOOT);
    d.console_log(name)
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap()
        .to_string()
}

fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn test_vm_clone_starts_clones_with_own_generation_id_cid_and_overlay() {
    // Arrange: a guest with vsock and a disk that read its generation ID, snapshotted.
    let d = TestDaemon::start(&[]);
    let disk = under(&d, "base.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut spec = testguest_spec("src", &["vmgenid"]);
    spec["disks"] = serde_json::json!([format!("{},format=raw", disk.display())]);
    spec["vsock"] = format!("cid=3,socket={}", under(&d, "src.vsock").display()).into();
    let vm = create(&d, spec);
    start(&d, &vm);
    let src_gen = console_line(&d, &vm, "OK vmgenid");
    d.cli_ok(&["snapshot", "create", &vm, "s1"]);

    // Act: clone while the source runs (refused), then after it stopped.
    let busy = d.cli(&["vm", "clone", "src/s1", "--count", "2"]);
    d.cli_ok(&["vm", "kill", &vm]);
    let out = d.cli_ok(&["vm", "clone", "s1", "--vm", "src", "--count", "2", "--json"]);
    let clones: Vec<Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<String> = clones
        .iter()
        .map(|c| c["spec"]["name"].as_str().unwrap().to_string())
        .collect();
    let mut reports = Vec::new();
    for name in &names {
        type_line(&d, name, "vmgenid");
        let gen = console_line(&d, name, "OK vmgenid");
        type_line(&d, name, "vsock");
        let vsock = console_line(&d, name, "OK vsock");
        reports.push((
            field(&gen, "id"),
            field(&gen, "changed"),
            field(&vsock, "cid"),
        ));
    }
    let info = d.vm(&names[0]);
    let overlay = info["spec"]["disks"][0]
        .as_str()
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let overlay_existed = std::path::Path::new(&overlay).exists();
    d.cli_ok(&["vm", "rm", "-f", &names[0]]);

    // Assert
    assert!(!busy.status.success());
    let busy_err = String::from_utf8_lossy(&busy.stderr);
    assert!(busy_err.contains("stop it first"), "{busy_err}");
    assert_eq!(names, ["src-clone-1", "src-clone-2"]);
    for c in &clones {
        assert_eq!(c["state"], "running", "{c}");
        assert_eq!(c["spec"]["clone_of"]["vm"], "src", "{c}");
        assert_eq!(c["spec"]["clone_of"]["snapshot"], "s1", "{c}");
    }
    let src_id = field(&src_gen, "id");
    assert_ne!(reports[0].0, reports[1].0, "{reports:?}");
    for (id, changed, cid) in &reports {
        assert_ne!(id, &src_id, "a clone's generation ID is new");
        assert_eq!(changed, "1", "the guest was notified");
        assert_ne!(cid, "3", "a clone has its own CID");
    }
    assert_ne!(reports[0].2, reports[1].2, "{reports:?}");
    assert!(overlay_existed, "{overlay}");
    assert!(overlay.contains("/disks/src-clone-1/"), "{overlay}");
    assert!(
        !std::path::Path::new(&overlay).exists(),
        "deleting a clone removes its overlay"
    );
}
