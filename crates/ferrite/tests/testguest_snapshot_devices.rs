//! Devices with host-side connections across a snapshot: a guest snapshotted with an open
//! vsock connection and a NIC on a TAP is restored in a fresh process; it learns that its
//! vsock connection is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), accepts and echoes a new
//! one, and answers pings on the same TAP.
//!
//! Runs in a network namespace of its own (see `common::netns`); needs root, `ip` and `ping`.

mod common;
mod testguest_common;

use std::path::Path;

use common::netns::{wait_up, Netns};
use testguest_common::control::Vm;
use testguest_common::vsock::{assert_ok_line, echo_through, hybrid_connect, SockDir};

/// `ferrite run` arguments for the test guest with a NIC on `tap` and a vsock at `socket`.
fn guest_args(tap: &str, socket: &Path, cmds: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        common::asset("testguest.elf").display().to_string(),
        "--memory".into(),
        "128M".into(),
        "--net".into(),
        format!("tap={tap},mac=52:54:00:00:05:02"),
        "--vsock".into(),
        format!("cid=7,socket={}", socket.display()),
        "--cmdline".into(),
        format!("cmds=\"{cmds}\""),
    ]
}

#[test]
fn test_restored_guest_is_told_of_the_vsock_reset_and_answers_on_vsock_and_net() {
    // Arrange: a guest with its NIC up, listening on vsock port 1234 with one host
    // connection open (and echoing) when it is snapshotted.
    let ns = Netns::enter();
    ns.tap("fsnap0", "10.0.5.1/24");
    let socks = SockDir::new("snapdev");
    let dir = std::env::temp_dir().join(format!("ferrite-snap-devices-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut original = Vm::spawn(
        "snap-devices",
        &guest_args("fsnap0", &socks.vm_socket(), "net-up 0 10.0.5.2/24"),
    );
    original.wait_line("OK net-up");
    original.send("vsock-listen 1234 1");
    original.wait_line("vsock listening port=1234");
    let (mut before, before_ok) = hybrid_connect(&socks.vm_socket(), 1234);
    assert_ok_line(&before_ok);
    std::io::Write::write_all(&mut before, b"open across the snapshot").unwrap();
    let reply = original.request(&format!(
        r#"{{"op":"snapshot","path":"{}"}}"#,
        dir.display()
    ));
    assert_eq!(reply["ok"], true, "{reply}");
    drop(original);

    // Act: restore. The reset alone ends the guest's listen (its one connection is gone);
    // then a new connection echoes, and the NIC serves pings.
    let mut restored = Vm::spawn(
        "snap-devices-r",
        &["--restore".into(), dir.display().to_string()],
    );
    let ended = restored.wait_line("OK vsock-listen");
    restored.send("vsock");
    let info = restored.wait_line("OK vsock ");
    restored.send("vsock-listen 1234 1");
    restored.wait_line("vsock listening port=1234");
    let (mut after, after_ok) = hybrid_connect(&socks.vm_socket(), 1234);
    let echoed = echo_through(&mut after, b"hello after restore");
    let listen = restored.wait_line("OK vsock-listen");
    restored.send("net-serve 60");
    restored.wait_line("OK net-serve started");
    wait_up("10.0.5.2");

    // Assert: the old connection ended by the reset, the new one echoed, the NIC answers.
    assert!(
        ended.contains("conns=1") && ended.contains("resets=1"),
        "the pre-snapshot connection should end by the transport reset: {ended}"
    );
    assert!(
        info.contains("cid=7") && info.contains("transport_resets=1"),
        "{info}"
    );
    assert_ok_line(&after_ok);
    assert_eq!(echoed, b"hello after restore");
    assert!(
        listen.contains("conns=1") && listen.contains("resets=0"),
        "{listen}"
    );
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_restored_balloon_keeps_its_target_and_pages_and_its_statistics_keep_flowing() {
    // Arrange: a guest with 32 MiB in its balloon (host target 32 MiB), snapshotted.
    let dir = std::env::temp_dir().join(format!("ferrite-snap-balloon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut original = Vm::spawn(
        "snap-balloon",
        &[
            "--kernel".into(),
            common::asset("testguest.elf").display().to_string(),
            "--memory".into(),
            "256M".into(),
            "--balloon=".into(),
            "--cmdline".into(),
            "cmds=\"balloon\"".into(),
        ],
    );
    original.wait_line("OK balloon");
    let set = original.request(r#"{"op":"balloon-set","target_mib":32}"#);
    assert_eq!(set["ok"], true, "{set}");
    original.send("balloon-wait 32");
    original.wait_line("OK balloon-wait");
    let reply = original.request(&format!(
        r#"{{"op":"snapshot","path":"{}"}}"#,
        dir.display()
    ));
    assert_eq!(reply["ok"], true, "{reply}");
    drop(original);

    // Act: restore; read the host's view, then have the guest deflate to a new target.
    let mut restored = Vm::spawn(
        "snap-balloon-r",
        &["--restore".into(), dir.display().to_string()],
    );
    let after_restore = restored.request(r#"{"op":"balloon-status"}"#);
    let lowered = restored.request(r#"{"op":"balloon-set","target_mib":8}"#);
    restored.send("balloon-wait 8");
    let waited = restored.wait_line("OK balloon-wait");
    // Asking for the status asks the guest for fresh statistics; its driver answers while
    // it runs.
    restored.request(r#"{"op":"balloon-status"}"#);
    restored.send("balloon-run 1");
    restored.wait_line("OK balloon-run");
    let later = restored.request(r#"{"op":"balloon-status"}"#);

    // Assert: target and actual came back; the guest deflated from 32 to 8 MiB; and the
    // statistics buffer the device held at the snapshot came back into use.
    assert_eq!(
        after_restore["balloon"]["target_mib"], 32,
        "{after_restore}"
    );
    assert_eq!(
        after_restore["balloon"]["actual_mib"], 32,
        "{after_restore}"
    );
    assert_eq!(lowered["ok"], true, "{lowered}");
    assert_eq!(later["balloon"]["actual_mib"], 8, "{later} / {waited}");
    assert_eq!(
        later["balloon"]["counters"]["deflated_pages"],
        24 * 256,
        "{later}"
    );
    assert!(
        later["balloon"]["stats"]["total_memory"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "statistics after the restore: {later}"
    );
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}
