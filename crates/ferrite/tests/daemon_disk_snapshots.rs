//! Live disk snapshots through ferrited: `ferrite disk-snapshot create` moves a running VM's
//! disk onto a qcow2 overlay and its definition follows (the next start writes to the
//! overlay); `revert` on the stopped VM brings back the disk as it was at the snapshot (the
//! guest's later writes are gone); `flatten` makes the disk standalone with the same data.
//! Requests the VM's state forbids are refused with `conflict`.

mod common;
mod daemon_common;

use std::time::Duration;

use daemon_common::{create, event_kinds, start, testguest_spec, TestDaemon};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(60);

/// Set the guest's commands (the VM is stopped), start it and wait for `last`'s answer; the
/// console lines of this run.
fn run_cmds(d: &TestDaemon, vm: &str, cmds: &[&str], last: &str) -> Vec<String> {
    let cmdline = format!("cmds=\"{}\"", cmds.join(";"));
    let (status, body) = d.api(
        "PATCH",
        &format!("/v1/vms/{vm}"),
        Some(json!({"cmdline": cmdline})),
    );
    assert_eq!(status, 200, "{body}");
    let from = d.console_log(vm).len();
    start(d, vm);
    let mut lines = Vec::new();
    d.wait(&format!("{last} on {vm}'s console"), BOOT, || {
        let log = d.console_log(vm);
        lines = log
            .get(from..)
            .unwrap_or("")
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        lines.iter().any(|l| l.starts_with(last))
    });
    lines
}

fn checks_match(lines: &[String], expected: usize) {
    let checks: Vec<&String> = lines.iter().filter(|l| l.contains("blk-check")).collect();
    assert_eq!(checks.len(), expected, "{lines:?}");
    assert!(
        checks.iter().all(|l| l.contains("result=match")),
        "{lines:?}"
    );
}

fn disk_entry(d: &TestDaemon, vm: &str) -> String {
    d.vm(vm)["spec"]["disks"][0]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn test_disk_snapshot_revert_and_flatten_through_the_daemon() {
    // Arrange: a VM whose guest writes pattern A, snapshotted live.
    let d = TestDaemon::start(&[]);
    let base = d.root.join("web-disk.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).expect("create base");
    let mut spec = testguest_spec("web", &["blk-write 0 0 64 1"]);
    spec["disks"] = json!([format!("{},format=raw,id=data", base.display())]);
    let vm = create(&d, spec);
    start(&d, &vm);
    d.wait_console(&vm, "OK blk-write", BOOT);
    let created = d.cli_ok(&["--json", "disk-snapshot", "create", &vm, "s1"]);
    let (dup, dup_body) = d.api(
        "POST",
        &format!("/v1/vms/{vm}/disk-snapshots"),
        Some(json!({"tag": "s1"})),
    );
    let (refused_revert, refused_body) = d.api(
        "POST",
        &format!("/v1/vms/{vm}/disk-snapshots/s1/revert"),
        None,
    );
    d.cli_ok(&["vm", "kill", &vm]);
    let overlay = d.root.join("web-disk@s1.qcow2");

    // The next run writes pattern B over part of A (through the overlay: the definition
    // follows the snapshot) and still reads A around it.
    let second = run_cmds(
        &d,
        &vm,
        &[
            "blk-write 0 16 16 3",
            "blk-check 0 0 16 1",
            "blk-check 0 16 16 3",
        ],
        "OK blk-check 0 sector=16",
    );
    d.cli_ok(&["vm", "kill", &vm]);
    let listed: Value =
        serde_json::from_str(&d.cli_ok(&["--json", "disk-snapshot", "ls", &vm])).expect("json");
    let table = d.cli_ok(&["disk-snapshot", "ls", &vm]);

    // Act: revert to s1, boot, check A; then flatten and check again.
    let reverted: Value =
        serde_json::from_str(&d.cli_ok(&["--json", "disk-snapshot", "revert", &vm, "s1"]))
            .expect("json");
    let after_revert = run_cmds(&d, &vm, &["blk-check 0 0 64 1"], "OK blk-check");
    d.cli_ok(&["vm", "kill", &vm]);
    let flattened = d.cli_ok(&["disk-snapshot", "flatten", &vm, "0"]);
    let (flat_status, flat_list) = d.api("GET", &format!("/v1/vms/{vm}/disk-snapshots"), None);
    let after_flatten = run_cmds(&d, &vm, &["blk-check 0 0 64 1"], "OK blk-check");
    d.cli_ok(&["vm", "kill", &vm]);

    // Assert
    let created: Value = serde_json::from_str(&created).expect("json");
    assert_eq!(
        created["disks"][0]["path"],
        overlay.display().to_string(),
        "{created}"
    );
    assert_eq!(created["disks"][0]["backing"], base.display().to_string());
    assert_eq!(dup, 409, "{dup_body}");
    assert_eq!(refused_revert, 409, "{refused_body}");
    assert!(
        refused_body["message"]
            .as_str()
            .unwrap_or("")
            .contains("stop or kill it"),
        "{refused_body}"
    );
    checks_match(&second, 2);
    assert_eq!(listed["snapshots"][0]["tag"], "s1", "{listed}");
    let chain: Vec<&str> = listed["disks"][0]["chain"]
        .as_array()
        .expect("chain")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert_eq!(
        chain,
        [overlay.display().to_string(), base.display().to_string()],
        "{listed}"
    );
    assert!(table.starts_with("TAG"), "{table}");
    let new_top = reverted["disks"][0]["path"].as_str().unwrap_or_default();
    assert_eq!(
        reverted["disks"][0]["detached"][0],
        overlay.display().to_string()
    );
    assert!(overlay.exists(), "the reverted-away layer is kept");
    checks_match(&after_revert, 1);
    assert!(flattened.contains("standalone"), "{flattened}");
    assert_eq!(flat_status, 200, "{flat_list}");
    assert_eq!(
        flat_list["disks"][0]["chain"].as_array().map(Vec::len),
        Some(1)
    );
    checks_match(&after_flatten, 1);
    assert!(disk_entry(&d, &vm).starts_with(&format!("{new_top},format=qcow2")));
    assert!(disk_entry(&d, &vm).contains("id=data"));
    let (bad_disk, bad_disk_body) = d.api("POST", &format!("/v1/vms/{vm}/disks/7/flatten"), None);
    assert_eq!(bad_disk, 400, "{bad_disk_body}");
    assert_eq!(bad_disk_body["field"], "disk", "{bad_disk_body}");
    let kinds = event_kinds(&d, &vm);
    let disk_kinds: Vec<&str> = kinds
        .iter()
        .map(String::as_str)
        .filter(|k| k.starts_with("disk"))
        .collect();
    assert_eq!(
        disk_kinds,
        [
            "disk-snapshot-created",
            "disk-snapshot-reverted",
            "disk-flattened"
        ],
        "{kinds:?}"
    );
}
