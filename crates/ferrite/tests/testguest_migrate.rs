//! Live migration with the test guest: a `ferrite run` source migrates its running guest to a
//! `ferrite run --incoming` destination over TCP or a Unix socket (`{"op":"migrate"}` on the
//! source's control socket). The guest keeps counting on the destination and verifies its own
//! memory; a copy that cannot converge stops cleanly; cutting the connection at any point
//! leaves exactly one side running the guest; incompatible peers are refused before memory
//! moves.

mod common;
mod testguest_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use testguest_common::control::Vm;
use testguest_common::migrate::*;
use testguest_common::{num, WATCHDOG};

#[test]
fn test_migrated_guest_keeps_counting_and_its_memory_checks_out() {
    // Arrange: a guest dirtying 8 MiB at 2000 pages/s, and a destination listening on TCP.
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("mig-count", "dirty 8 2000 100");
    let before = src.wait_line("tick n=3 ");
    let mut dst = start_destination("mig-count-d", &endpoint);

    // Act
    migrate(&mut src, serde_json::json!({"to": endpoint}));
    let (status, _) = wait_migration(&mut src);
    let src_exit = src.wait_exit(WATCHDOG);
    let src_err = stderr_of(&mut src);
    let first = dst.wait_line("tick ");
    let later = dst.wait_line(&format!("tick n={} ", num(&first, "n") + 3));
    dst.send("x");
    let stopped = dst.wait_line("OK dirty stopped");
    dst.send("dirty-check");
    let check = dst.wait_any(&["OK dirty-check", "ERR dirty-check"]);

    // Assert: the source handed over and stopped; the guest continued from its own values.
    assert_eq!(src_exit.code(), Some(MIGRATED), "{status} {src_err}");
    assert!(src_err.contains("migrated to tcp:"), "{src_err}");
    assert!(num(&first, "n") > num(&before, "n"), "{before} / {first}");
    assert!(
        num(&first, "value") > num(&before, "value"),
        "{before} / {first}"
    );
    assert!(
        num(&later, "value") > num(&first, "value"),
        "{first} / {later}"
    );
    assert!(
        num(&stopped, "dirtied") > num(&before, "dirtied"),
        "{stopped}"
    );
    assert!(check.starts_with("OK dirty-check"), "{check}");
}

#[test]
fn test_idle_guest_memory_is_identical_after_migration_over_a_unix_socket() {
    // Arrange: 32 MiB of pattern, its checksum taken on the source.
    let endpoint = format!(
        "unix:{}",
        std::env::temp_dir()
            .join(format!("ferrite-mig-{}.sock", std::process::id()))
            .display()
    );
    let mut src = Vm::start("mig-idle", "mem-fill 11 32;mem-sum 32");
    let sum_before = src.wait_line("OK mem-sum");
    let mut dst = start_destination("mig-idle-d", &endpoint);

    // Act
    migrate(&mut src, serde_json::json!({"to": endpoint}));
    let src_exit = src.wait_exit(WATCHDOG);
    dst.send("mem-sum 32");
    let sum_after = dst.wait_line("OK mem-sum");
    dst.send("mem-check 11 32");
    let check = dst.wait_any(&["OK mem-check", "ERR mem-check"]);
    let info = dst.request(r#"{"op":"info"}"#);

    // Assert
    assert_eq!(src_exit.code(), Some(MIGRATED));
    assert_eq!(sum_after, sum_before);
    assert!(check.starts_with("OK mem-check"), "{check}");
    assert_eq!(info["config"]["memory_bytes"], 128u64 << 20, "{info}");
}

#[test]
fn test_round_zero_over_four_connections_delivers_every_page() {
    // Arrange: 64 MiB of pattern (four 16 MiB stripes) and a guest dirtying 4 MiB of it.
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("mig-par", "mem-fill 13 64;dirty 4 2000 100");
    src.wait_line("tick n=3 ");
    let mut dst = start_destination("mig-par-d", &endpoint);

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": endpoint, "connections": 4}),
    );
    let src_exit = src.wait_exit(WATCHDOG);
    let src_err = stderr_of(&mut src);
    dst.wait_line("tick ");
    dst.send("x");
    dst.wait_line("OK dirty stopped");
    dst.send("dirty-check");
    let dirty = dst.wait_any(&["OK dirty-check", "ERR dirty-check"]);
    dst.send("mem-check 13 64");
    let check = dst.wait_any(&["OK mem-check", "ERR mem-check"]);

    // Assert: the dirtied first 4 MiB check out as the dirtying left them; the rest of the
    // pattern (all stripes but the first's start) arrived intact.
    assert_eq!(src_exit.code(), Some(MIGRATED), "{src_err}");
    assert!(dirty.starts_with("OK dirty-check pages=1024"), "{dirty}");
    // mem-check sees exactly the 4 MiB the dirtying rewrote as mismatches.
    assert!(
        check.contains("first_bad=0x1000000 bad_words=524288 "),
        "{check}"
    );
}

#[test]
fn test_copy_that_cannot_converge_stops_at_the_timeout_and_the_source_keeps_running() {
    // Arrange: a guest rewriting 32 MiB as fast as it can over a 16 MiB/s link.
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("mig-abort", "dirty 32 0 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination("mig-abort-d", &endpoint);

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": endpoint, "bandwidth_mib_s": 16, "timeout_s": 3,
                           "converge": "abort"}),
    );
    let (status, max_throttle) = wait_migration(&mut src);

    // Assert
    assert_eq!(status["phase"], "failed", "{status}");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not converge")),
        "{status}"
    );
    assert_eq!(max_throttle, 0, "converge=abort never throttles");
    assert_source_runs_on(&mut src);
    assert_never_ran(&mut dst);
}

#[test]
fn test_guest_dirtying_faster_than_the_link_converges_by_throttling() {
    // Arrange: 20000 pages/s (78 MiB/s) of writes over a 32 MiB/s link.
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("mig-throttle", "dirty 16 20000 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination("mig-throttle-d", &endpoint);

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": endpoint, "bandwidth_mib_s": 32, "downtime_ms": 50,
                           "timeout_s": 100, "converge": "throttle"}),
    );
    let (status, max_throttle) = wait_migration(&mut src);
    let src_exit = src.wait_exit(WATCHDOG);
    dst.wait_line("tick ");
    dst.send("x");
    dst.wait_line("OK dirty stopped");
    dst.send("dirty-check");
    let check = dst.wait_any(&["OK dirty-check", "ERR dirty-check"]);

    // Assert
    assert_eq!(src_exit.code(), Some(MIGRATED), "{status}");
    assert!(max_throttle > 0, "the guest was never throttled: {status}");
    assert!(check.starts_with("OK dirty-check"), "{check}");
}

#[test]
fn test_cancelled_migration_leaves_the_source_running() {
    // Arrange: enough memory to copy slowly (32 MiB at 4 MiB/s).
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("mig-cancel", "mem-fill 3 32;dirty 4 500 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination("mig-cancel-d", &endpoint);
    migrate(
        &mut src,
        serde_json::json!({"to": endpoint, "bandwidth_mib_s": 4}),
    );
    std::thread::sleep(Duration::from_millis(500));

    // Act
    let reply = src.request(r#"{"op":"migrate-cancel"}"#);
    let (status, _) = wait_migration(&mut src);

    // Assert
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(status["phase"], "cancelled", "{status}");
    assert_source_runs_on(&mut src);
    assert_never_ran(&mut dst);
}

#[test]
fn test_connection_cut_during_the_copy_rounds_leaves_the_source_running() {
    // Arrange: a proxy that cuts after 2 MiB of a slow (8 MiB/s) copy.
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("mig-cut1", "mem-fill 5 16;dirty 4 500 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination("mig-cut1-d", &endpoint);
    let proxy = cutting_proxy(&endpoint, Cut::SourceBytes(2 << 20));

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": proxy, "bandwidth_mib_s": 8}),
    );
    let (status, _) = wait_migration(&mut src);

    // Assert
    assert_eq!(status["phase"], "failed", "{status}");
    assert_source_runs_on(&mut src);
    assert_never_ran(&mut dst);
}

#[test]
fn test_connection_cut_after_the_final_state_before_the_commit_leaves_the_source_running() {
    // Arrange: the proxy swallows the destination's "ready" (the state arrived, the VM is
    // built, the source is paused waiting to commit) and cuts.
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("mig-cut2", "dirty 4 500 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination("mig-cut2-d", &endpoint);
    let proxy = cutting_proxy(&endpoint, Cut::ReplyByte(2));

    // Act
    migrate(&mut src, serde_json::json!({"to": proxy}));
    let (status, _) = wait_migration(&mut src);

    // Assert: the source resumed its guest, the destination discarded everything.
    assert_eq!(status["phase"], "failed", "{status}");
    assert_source_runs_on(&mut src);
    assert_never_ran(&mut dst);
}

#[test]
fn test_connection_cut_after_the_commit_runs_the_guest_only_on_the_destination() {
    // Arrange: the proxy passes the commit but swallows the destination's "running".
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("mig-cut3", "dirty 4 500 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination("mig-cut3-d", &endpoint);
    let proxy = cutting_proxy(&endpoint, Cut::ReplyByte(3));

    // Act
    migrate(&mut src, serde_json::json!({"to": proxy}));
    let (status, _) = wait_migration(&mut src);
    let src_lines = src.lines_within(Duration::from_millis(500));
    let stats = src.request(r#"{"op":"stats"}"#);
    let dst_tick = dst.wait_line("tick ");

    // Assert: the source keeps its copy paused and says why; the guest runs on the
    // destination.
    assert_eq!(status["phase"], "unknown", "{status}");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|e| e.contains("stays paused")),
        "{status}"
    );
    assert_eq!(stats["state"], "paused", "{stats}");
    // Console output reaches the log asynchronously: a tick printed before the pause may
    // still arrive now, but none may count past the destination's first.
    let first_on_dst = num(&dst_tick, "n");
    assert!(
        src_lines
            .iter()
            .filter(|l| l.starts_with("tick "))
            .all(|l| num(l, "n") < first_on_dst),
        "source lines {src_lines:?}, destination's first tick {dst_tick}"
    );
    assert!(num(&dst_tick, "value") > 0);
}

/// The first bytes of a migration stream: magic and protocol version.
fn stream_start(version: u32) -> Vec<u8> {
    let mut out = b"FERRMIG\0".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out
}

/// Send `bytes` to a fresh `--incoming` destination; returns its reply and the process.
fn talk_to_destination(name: &str, bytes: &[u8]) -> (Vec<u8>, Vm) {
    let endpoint = free_tcp_endpoint();
    let dst = start_destination(name, &endpoint);
    let addr = endpoint.trim_start_matches("tcp:").to_string();
    let deadline = Instant::now() + WATCHDOG;
    let mut conn = loop {
        match TcpStream::connect(&addr) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("connect {addr}: {e}"),
        }
    };
    conn.write_all(bytes).expect("send");
    conn.set_read_timeout(Some(WATCHDOG)).unwrap();
    let mut reply = Vec::new();
    let _ = conn.read_to_end(&mut reply);
    (reply, dst)
}

#[test]
fn test_destination_refuses_another_protocol_version_before_any_memory_moves() {
    // Arrange
    let hello = stream_start(99);

    // Act
    let (reply, mut dst) = talk_to_destination("mig-ver", &hello);
    let status = dst.wait_exit(WATCHDOG);
    let stderr = stderr_of(&mut dst);

    // Assert: a refusal (0x82) naming the fix, and a usage-error exit.
    assert_eq!(reply.first(), Some(&0x82), "{reply:?}");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("same Ferrite version"), "{text}");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("migration protocol 99"), "{stderr}");
}

#[test]
fn test_destination_refuses_another_ferrite_version() {
    // Arrange: a well-formed hello from a different Ferrite release.
    let json = serde_json::json!({
        "ferrite_version": "0.0.1-other",
        "config": {},
        "regions": [],
    })
    .to_string();
    let mut hello = stream_start(2);
    hello.extend_from_slice(&(json.len() as u32).to_le_bytes());
    hello.extend_from_slice(json.as_bytes());

    // Act
    let (reply, mut dst) = talk_to_destination("mig-fver", &hello);
    let status = dst.wait_exit(WATCHDOG);

    // Assert
    assert_eq!(reply.first(), Some(&0x82), "{reply:?}");
    assert!(
        String::from_utf8_lossy(&reply).contains("0.0.1-other"),
        "{reply:?}"
    );
    assert_eq!(status.code(), Some(2));
}

#[test]
fn test_disk_on_shared_storage_moves_with_the_guest_and_stays_consistent() {
    // Arrange: a guest that wrote a pattern to its disk and keeps dirtying memory.
    let disk = testguest_common::ScratchDisk::zeroed("mig-disk", 1 << 20);
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::boot(
        "mig-disk",
        &[
            "--disk".into(),
            format!("{},format=raw", disk.arg()),
            "--cmdline".into(),
            "cmds=\"blk-write 0 0 64 7;dirty 4 500 100\"".into(),
        ],
    );
    src.wait_line("OK blk-write");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination("mig-disk-d", &endpoint);

    // Act: migrate, then write more from the destination and power off.
    migrate(&mut src, serde_json::json!({"to": endpoint}));
    let src_exit = src.wait_exit(WATCHDOG);
    dst.wait_line("tick ");
    dst.send("x");
    dst.wait_line("OK dirty stopped");
    dst.send("blk-check 0 0 64 7");
    let check = dst.wait_any(&["OK blk-check", "ERR blk-check"]);
    dst.send("blk-write 0 64 32 9");
    let write = dst.wait_any(&["OK blk-write", "ERR blk-write"]);
    dst.send("poweroff");
    let dst_exit = dst.wait_exit(WATCHDOG);
    let on_disk = disk.read();

    // Assert: the destination read the source's data, wrote its own, and both are on disk.
    assert_eq!(src_exit.code(), Some(MIGRATED));
    assert!(check.starts_with("OK blk-check"), "{check}");
    assert!(write.starts_with("OK blk-write"), "{write}");
    assert!(dst_exit.success(), "{dst_exit:?}");
    assert_eq!(
        &on_disk[..64 * 512],
        &testguest_common::pattern_bytes(7, 0, 64)[..]
    );
    assert_eq!(
        &on_disk[64 * 512..96 * 512],
        &testguest_common::pattern_bytes(9, 64, 32)[..]
    );
}

#[test]
fn test_failed_migration_gives_the_disk_back_to_the_source() {
    // Arrange: the destination's "ready" is swallowed, after the source let go of the disk.
    let disk = testguest_common::ScratchDisk::zeroed("mig-disk-back", 1 << 20);
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::boot(
        "mig-disk-back",
        &[
            "--disk".into(),
            format!("{},format=raw", disk.arg()),
            "--cmdline".into(),
            "cmds=\"dirty 4 500 100\"".into(),
        ],
    );
    src.wait_line("tick n=2 ");
    let mut dst = start_destination("mig-disk-back-d", &endpoint);
    let proxy = cutting_proxy(&endpoint, Cut::ReplyByte(2));

    // Act
    migrate(&mut src, serde_json::json!({"to": proxy}));
    let (status, _) = wait_migration(&mut src);
    assert_never_ran(&mut dst);
    src.wait_line("tick ");
    src.send("x");
    src.wait_line("OK dirty stopped");
    src.send("blk-write 0 0 16 5");
    let write = src.wait_any(&["OK blk-write", "ERR blk-write"]);
    let second_user = std::process::Command::new(common::ferrite_bin())
        .args(["run", "--kernel"])
        .arg(common::asset("testguest.elf"))
        .args(["--memory", "128M", "--disk"])
        .arg(format!("{},format=raw", disk.arg()))
        .output()
        .expect("run a second VM");

    // Assert: the source owns its disk again (writes work, another VM is kept off it).
    assert_eq!(status["phase"], "failed", "{status}");
    assert!(write.starts_with("OK blk-write"), "{write}");
    assert_eq!(second_user.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&second_user.stderr).contains("locked by another"),
        "{}",
        String::from_utf8_lossy(&second_user.stderr)
    );
}

#[test]
fn test_same_host_handover_passes_memory_by_file_descriptor_without_copying_it() {
    // Arrange: a guest in shared memory, dirtying 4 MiB.
    let endpoint = format!(
        "unix:{}",
        std::env::temp_dir()
            .join(format!("ferrite-mig-fd-{}.sock", std::process::id()))
            .display()
    );
    let mut src = Vm::boot(
        "mig-fd",
        &[
            "--memory-shared".into(),
            "--cmdline".into(),
            "cmds=\"dirty 4 2000 100\"".into(),
        ],
    );
    let before = src.wait_line("tick n=3 ");
    let mut dst = start_destination("mig-fd-d", &endpoint);

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": endpoint, "fd_handover": true}),
    );
    let src_exit = src.wait_exit(WATCHDOG);
    let src_err = stderr_of(&mut src);
    let first = dst.wait_line("tick ");
    dst.send("x");
    dst.wait_line("OK dirty stopped");
    dst.send("dirty-check");
    let check = dst.wait_any(&["OK dirty-check", "ERR dirty-check"]);

    // Assert: no page was sent, and the guest continued with all its memory.
    assert_eq!(src_exit.code(), Some(MIGRATED), "{src_err}");
    assert!(src_err.contains("(0 pages, 0 zero pages)"), "{src_err}");
    assert!(
        num(&first, "value") > num(&before, "value"),
        "{before} / {first}"
    );
    assert!(check.starts_with("OK dirty-check"), "{check}");
}

#[test]
fn test_handover_needs_shared_memory_and_a_unix_endpoint() {
    // Arrange: a VM in anonymous memory.
    let mut src = Vm::start("mig-fd-no", "dirty 4 500 100");
    src.wait_line("tick n=1 ");

    // Act
    let anonymous = src.request(r#"{"op":"migrate","to":"unix:/tmp/x.sock","fd_handover":true}"#);
    let over_tcp = src.request(r#"{"op":"migrate","to":"tcp:127.0.0.1:9","fd_handover":true}"#);

    // Assert
    assert_eq!(anonymous["error"], "not-supported", "{anonymous}");
    assert!(
        anonymous["message"]
            .as_str()
            .is_some_and(|m| m.contains("--memory-shared")),
        "{anonymous}"
    );
    assert_eq!(over_tcp["error"], "bad-request", "{over_tcp}");
    assert_source_runs_on(&mut src);
}
