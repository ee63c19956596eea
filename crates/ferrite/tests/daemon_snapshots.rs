//! Snapshots through ferrited: a counting guest is snapshotted with `ferrite snapshot create`,
//! killed, and restored with `ferrite snapshot restore`; its console shows it counting on from
//! where it was. The API refuses what it cannot do with the stable error codes.

mod common;
mod daemon_common;

use std::path::Path;
use std::time::Duration;

use daemon_common::{create, event_kinds, start, testguest_spec, TestDaemon};
use serde_json::{json, Value};

const READY: &str = "FERRITE-TESTGUEST READY";
const BOOT: Duration = Duration::from_secs(60);

/// `(n, value)` of a complete `tick n=K value=V tsc=T` line.
fn tick(line: &str) -> Option<(u64, u64)> {
    let mut words = line.split_whitespace();
    if words.next() != Some("tick") {
        return None;
    }
    let mut field = |key: &str| words.next()?.strip_prefix(key)?.parse().ok();
    let n = field("n=")?;
    let value = field("value=")?;
    field("tsc=").map(|_: u64| (n, value))
}

/// The ticks in `log` from byte `from` on, skipping a line cut by a killed VMM.
fn ticks_from(log: &str, from: usize) -> Vec<(u64, u64)> {
    let from = if from > log.len() { 0 } else { from };
    log.get(from..)
        .unwrap_or("")
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(tick)
        .collect()
}

/// Wait until VM `name`'s console has `count` ticks after byte `from`; returns them.
fn wait_ticks(d: &TestDaemon, name: &str, from: usize, count: usize) -> Vec<(u64, u64)> {
    let mut ticks = Vec::new();
    d.wait(
        &format!("{count} ticks of {name} after byte {from}"),
        BOOT,
        || {
            ticks = ticks_from(&d.console_log(name), from);
            ticks.len() >= count
        },
    );
    ticks
}

fn status_of(out: &std::process::Output) -> (bool, String) {
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn test_restored_vm_counts_on_from_its_snapshot() {
    // Arrange: a guest counting on its console, snapshotted with the CLI while it runs.
    let d = TestDaemon::start(&[]);
    let vm = create(&d, testguest_spec("counter", &["count-forever 100"]));
    d.cli_ok(&["vm", "start", &vm]);
    let booted = wait_ticks(&d, &vm, 0, 3);
    let before = *booted.last().unwrap();
    let len_before = d.console_log(&vm).len();

    let created = d.cli_ok(&["snapshot", "create", &vm, "s1"]);
    let len_created = d.console_log(&vm).len();
    let after = wait_ticks(&d, &vm, len_created, 1)[0];
    let state_after_snapshot = d.state(&vm);
    let at_snapshot = ticks_from(&d.console_log(&vm), len_before);

    d.cli_ok(&["vm", "kill", &vm]);
    let len_killed = d.console_log(&vm).len();
    let state_killed = d.state(&vm);

    // Act: restore it.
    let restored = d.cli_ok(&["snapshot", "restore", &vm, "s1"]);
    let resumed = wait_ticks(&d, &vm, len_killed, 4);
    let info = d.vm(&vm);

    // Assert: it runs again, from the snapshot, and its counter goes on from there.
    assert!(created.contains("snapshot s1"), "{created}");
    assert_eq!(state_after_snapshot, "running");
    assert_eq!(state_killed, "stopped");
    assert!(restored.contains("running"), "{restored}");
    assert_eq!(info["state"], "running", "{info}");
    let pid = info["pid"].as_u64().expect("a restored VM has a pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--restore"),
        "the VMM was started from the snapshot"
    );
    let first = resumed[0];
    assert!(
        first.0 > before.0,
        "tick numbers continue: {before:?} before the snapshot, {first:?} after restore"
    );
    assert!(
        first.1 >= before.1 && first.1 <= after.1,
        "the restored counter {first:?} starts between the last value before the snapshot \
         {before:?} and the original's next tick after it {after:?} (ticks meanwhile: \
         {at_snapshot:?})"
    );
    for pair in resumed.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "n counts on: {resumed:?}");
        assert!(pair[1].1 > pair[0].1, "value counts on: {resumed:?}");
    }

    // A restored VM cannot be snapshotted again until it reboots: the VMM says so (501).
    let (status, again) = d.api(
        "POST",
        &format!("/v1/vms/{vm}/snapshots"),
        Some(json!({"name": "s2"})),
    );
    assert_eq!(status, 501, "{again}");
    assert_eq!(again["code"], "not-supported", "{again}");

    // It is listed, as a table and as JSON.
    let table = d.cli_ok(&["snapshot", "ls", &vm]);
    let listed: Value =
        serde_json::from_str(&d.cli_ok(&["--json", "snapshot", "ls", &vm])).unwrap();
    let dir = d.root.join("state/snapshots").join(&vm).join("s1");
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("s1 ")), "{table}");
    assert!(table.contains(&dir.display().to_string()), "{table}");
    let list = listed.as_array().unwrap();
    assert_eq!(list.len(), 1, "{listed}");
    assert_eq!(list[0]["vm"], vm.as_str());
    assert_eq!(list[0]["name"], "s1");
    assert_eq!(list[0]["path"], dir.display().to_string());
    assert!(list[0]["memory_bytes"].as_u64().unwrap() > 0, "{listed}");
    assert!(list[0]["state_bytes"].as_u64().unwrap() > 0, "{listed}");
    assert!(list[0]["created_ms"].as_u64().unwrap() > 0, "{listed}");
    assert!(dir.is_dir());

    // Restoring over the running VM is refused; once it is killed the snapshot can go.
    let refused = d.cli(&["snapshot", "restore", &vm, "s1"]);
    let (ok, stderr) = status_of(&refused);
    assert!(!ok && stderr.contains("stop or kill it"), "{stderr}");
    d.cli_ok(&["vm", "kill", &vm]);
    d.cli_ok(&["snapshot", "rm", &vm, "s1"]);
    assert!(!dir.exists(), "snapshot rm removes {}", dir.display());
    let empty = d.cli_ok(&["--json", "snapshot", "ls", &vm]);
    assert_eq!(serde_json::from_str::<Value>(&empty).unwrap(), json!([]));
    let kinds = event_kinds(&d, &vm);
    let order: Vec<&str> = kinds
        .iter()
        .map(String::as_str)
        .filter(|k| ["snapshot-created", "restored", "snapshot-deleted"].contains(k))
        .collect();
    assert_eq!(
        order,
        ["snapshot-created", "restored", "snapshot-deleted"],
        "{kinds:?}"
    );
}

#[test]
fn test_snapshot_requests_the_vm_cannot_serve_are_refused_with_codes() {
    let d = TestDaemon::start(&[]);
    let vm = create(&d, testguest_spec("idle", &[]));
    let snaps = format!("/v1/vms/{vm}/snapshots");

    // A stopped VM cannot be snapshotted; bad bodies name their field.
    let (stopped, stopped_body) = d.api("POST", &snaps, Some(json!({"name": "s1"})));
    let (bad, bad_body) = d.api("POST", &snaps, Some(json!({"name": "../x"})));
    let (unknown, unknown_body) = d.api("POST", &snaps, Some(json!({"name": "s1", "x": 1})));
    let (no_vm, _) = d.api("GET", "/v1/vms/nope/snapshots", None);
    assert_eq!(stopped, 409, "{stopped_body}");
    assert_eq!(stopped_body["code"], "conflict");
    assert_eq!(bad, 400, "{bad_body}");
    assert_eq!(bad_body["field"], "name", "{bad_body}");
    assert_eq!(unknown, 400, "{unknown_body}");
    assert_eq!(no_vm, 404);

    // A running VM: taken once, refused twice, stay_paused leaves it paused.
    start(&d, &vm);
    d.wait_console(&vm, READY, BOOT);
    let (created, info) = d.api("POST", &snaps, Some(json!({"name": "s1"})));
    let (dup, dup_body) = d.api("POST", &snaps, Some(json!({"name": "s1"})));
    let (paused, paused_body) = d.api(
        "POST",
        &snaps,
        Some(json!({"name": "s2", "stay_paused": true})),
    );
    let state_paused = d.state(&vm);
    let (running, running_body) = d.api("POST", &format!("{snaps}/s1/restore"), None);
    assert_eq!(created, 201, "{info}");
    assert_eq!(info["name"], "s1");
    assert!(Path::new(info["path"].as_str().unwrap())
        .join("state.bin")
        .exists());
    assert_eq!(dup, 409, "{dup_body}");
    assert_eq!(dup_body["code"], "conflict");
    assert_eq!(paused, 201, "{paused_body}");
    assert_eq!(state_paused, "paused");
    assert_eq!(running, 409, "{running_body}");
    assert_eq!(running_body["code"], "conflict");

    // Resume and kill it; then unknown and invalid snapshot names are refused.
    d.cli_ok(&["vm", "resume", &vm]);
    d.cli_ok(&["vm", "kill", &vm]);
    let (nope, nope_body) = d.api("POST", &format!("{snaps}/nope/restore"), None);
    let (nope_rm, _) = d.api("DELETE", &format!("{snaps}/nope"), None);
    let (bad_path, bad_path_body) = d.api("DELETE", &format!("{snaps}/.hidden"), None);
    assert_eq!(nope, 404, "{nope_body}");
    assert_eq!(nope_body["code"], "not-found");
    assert_eq!(nope_rm, 404);
    assert_eq!(bad_path, 400, "{bad_path_body}");
    assert_eq!(bad_path_body["field"], "snapshot", "{bad_path_body}");

    // Restoring the paused snapshot starts the VM paused where it was; deleting the VM
    // deletes its snapshots.
    let (restored, restored_body) = d.api("POST", &format!("{snaps}/s2/restore"), None);
    assert_eq!(restored, 200, "{restored_body}\n{}", d.vmm_log(&vm));
    d.cli_ok(&["vm", "rm", "--force", &vm]);
    assert!(!d.root.join("state/snapshots").join(&vm).exists());
}
