//! Dirty-page tracking through KVM's per-vCPU dirty ring (`--dirty-log ring`) and its bitmap
//! (`--dirty-log bitmap`), with the test guest: a dirtying guest migrates with either and
//! verifies every page on the destination; a diff snapshot taken with the ring holds exactly
//! the pages written since the full one; a ring so small that the vCPUs keep filling it
//! (`KVM_EXIT_DIRTY_RING_FULL`) still loses no page.

mod common;
mod testguest_common;

use std::path::{Path, PathBuf};

use testguest_common::control::Vm;
use testguest_common::migrate::*;
use testguest_common::{num, WATCHDOG};

/// Boot a guest with `--dirty-log MODE` (plus `extra` flags and `env`) that dirties
/// `dirty` (the guest's `dirty MIB RATE REPORT_MS`), migrate it over TCP at up to
/// `bandwidth_mib_s` (0: unlimited), and return the last migration status, the source's
/// stderr, the destination's `dirty-check` line and the source's exit code.
fn migrate_dirtying_guest(
    name: &str,
    mode: &str,
    dirty: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    bandwidth_mib_s: u64,
) -> (serde_json::Value, String, String, Option<i32>) {
    let endpoint = free_tcp_endpoint();
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        common::asset("testguest.elf").display().to_string(),
        "--memory".into(),
        "128M".into(),
        "--dirty-log".into(),
        mode.into(),
        "--cmdline".into(),
        format!("cmds=\"{dirty}\""),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut src = Vm::spawn_with_env(name, &args, env);
    src.wait_line("tick n=3 ");
    let mut dst = start_destination(&format!("{name}-d"), &endpoint);

    migrate(
        &mut src,
        serde_json::json!({"to": endpoint, "downtime_ms": 50, "timeout_s": 100,
                           "bandwidth_mib_s": bandwidth_mib_s}),
    );
    let (status, _) = wait_migration(&mut src);
    let src_exit = src.wait_exit(WATCHDOG);
    let src_err = stderr_of(&mut src);
    let first = dst.wait_line("tick ");
    dst.wait_line(&format!("tick n={} ", num(&first, "n") + 2));
    dst.send("x");
    dst.wait_line("OK dirty stopped");
    dst.send("dirty-check");
    let check = dst.wait_any(&["OK dirty-check", "ERR dirty-check"]);
    (status, src_err, check, src_exit.code())
}

#[test]
fn test_dirtying_guest_migrates_with_the_dirty_ring_and_every_page_checks_out() {
    // Arrange + Act: 8 MiB rewritten at 2000 pages/s, the source on the dirty ring.
    let (status, src_err, check, code) =
        migrate_dirtying_guest("ring-mig", "ring", "dirty 8 2000 100", &[], &[], 0);

    // Assert: the ring was the tracker, and every page arrived as the guest last wrote it.
    assert_eq!(code, Some(MIGRATED), "{status} {src_err}");
    assert_eq!(status["dirty_log"], "ring", "{status}");
    assert!(src_err.contains("dirty log ring: "), "{src_err}");
    assert!(check.starts_with("OK dirty-check"), "{check}");
}

#[test]
fn test_dirtying_guest_migrates_with_the_dirty_bitmap_and_every_page_checks_out() {
    // Arrange + Act: the same guest, the source told to use the bitmap.
    let (status, src_err, check, code) =
        migrate_dirtying_guest("bitmap-mig", "bitmap", "dirty 8 2000 100", &[], &[], 0);

    // Assert
    assert_eq!(code, Some(MIGRATED), "{status} {src_err}");
    assert_eq!(status["dirty_log"], "bitmap", "{status}");
    assert!(src_err.contains("dirty log bitmap: "), "{src_err}");
    assert!(check.starts_with("OK dirty-check"), "{check}");
}

#[test]
fn test_full_dirty_rings_are_drained_by_the_vcpu_and_the_migration_loses_no_page() {
    // Arrange + Act: 16 KiB rings (1024 entries, full after 960) and a guest rewriting
    // 16 MiB at 5000 pages/s over a 32 MiB/s link: the first round alone takes over half a
    // second, in which the vCPU dirties ~2500 pages, so it fills its ring more than once.
    let (status, src_err, check, code) = migrate_dirtying_guest(
        "ring-full",
        "ring",
        "dirty 16 5000 100",
        &["--stats"],
        &[("FERRITE_DIRTY_RING_BYTES", "16384")],
        32,
    );

    // Assert: the vCPU hit full rings (and went on), no ring overflowed (which would make
    // the source resend everything), and no dirtied page was lost.
    let full_exits: u64 = src_err
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dirty_ring_full="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(code, Some(MIGRATED), "{status} {src_err}");
    assert!(full_exits > 0, "no KVM_EXIT_DIRTY_RING_FULL: {src_err}");
    assert!(!src_err.contains("overflowed"), "{src_err}");
    assert_eq!(status["dirty_log"], "ring", "{status}");
    assert!(check.starts_with("OK dirty-check"), "{check}");
}

#[test]
fn test_bad_dirty_ring_size_is_refused_with_what_to_give() {
    // Arrange + Act: a ring size that is not a power of two.
    let mut vm = Vm::spawn_with_env(
        "ring-bad",
        &[
            "--kernel".into(),
            common::asset("testguest.elf").display().to_string(),
            "--dirty-log".into(),
            "ring".into(),
        ],
        &[("FERRITE_DIRTY_RING_BYTES", "5000")],
    );
    let status = vm.wait_exit(WATCHDOG);
    let stderr = stderr_of(&mut vm);

    // Assert
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("FERRITE_DIRTY_RING_BYTES=\"5000\"") && stderr.contains("power of two"),
        "{stderr}"
    );
}

/// A fresh, not yet existing snapshot directory for `name`.
fn snapshot_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrite-ring-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn snapshot(vm: &mut Vm, dir: &Path, diff: bool) -> serde_json::Value {
    let reply =
        vm.request(&serde_json::json!({"op": "snapshot", "path": dir, "diff": diff}).to_string());
    assert_eq!(reply["ok"], true, "{reply}");
    reply
}

#[test]
fn test_diff_snapshot_with_the_dirty_ring_holds_exactly_the_pages_written_since_the_full_one() {
    // Arrange: a guest on the dirty ring with 4 MiB of pattern, snapshotted in full; then it
    // writes 8 MiB of another pattern over and past it.
    let (full, diff, merged) = (
        snapshot_dir("full"),
        snapshot_dir("diff"),
        snapshot_dir("merged"),
    );
    let mut vm = Vm::boot(
        "ring-diff",
        &[
            "--dirty-log".into(),
            "ring".into(),
            "--track-dirty-pages".into(),
            "--cmdline".into(),
            "cmds=\"mem-fill 3 4\"".into(),
        ],
    );
    vm.wait_line("OK mem-fill");
    snapshot(&mut vm, &full, false);
    vm.send("mem-fill 5 8");
    vm.wait_line("OK mem-fill");

    // Act: the diff, merged onto the full snapshot and restored.
    let diff_reply = snapshot(&mut vm, &diff, true);
    drop(vm);
    let merge = std::process::Command::new(common::ferrite_bin())
        .args(["snapshot", "merge"])
        .arg(&diff)
        .arg(&merged)
        .output()
        .unwrap();
    let mut restored = Vm::spawn(
        "ring-diff-r",
        &["--restore".into(), merged.display().to_string()],
    );
    restored.send("mem-check 5 8");
    let check = restored.wait_any(&["OK mem-check", "ERR mem-check"]);

    // Assert: the diff holds the 8 MiB written (2048 pages) and little else (the guest's
    // stack and console state), and the merged snapshot has every one of them.
    let written = diff_reply["snapshot"]["memory_bytes_written"]
        .as_u64()
        .unwrap();
    assert!(
        (8 << 20..(8 << 20) + (256 << 10)).contains(&written),
        "the diff holds the 8 MiB written since the full snapshot: {written} bytes"
    );
    assert!(
        merge.status.success(),
        "{}",
        String::from_utf8_lossy(&merge.stderr)
    );
    assert!(check.starts_with("OK mem-check"), "{check}");
    for d in [&full, &diff, &merged] {
        let _ = std::fs::remove_dir_all(d);
    }
}
